"""VBench's official aggregation constants (facts, transcribed with VBench's own dimension keys).

Source: Vchitect/VBench `scripts/constant.py` (NORMALIZE_DIC, DIM_WEIGHT, QUALITY_LIST, SEMANTIC_LIST, QUALITY_WEIGHT,
SEMANTIC_WEIGHT; identical at commits d63e77f7 and 7975661c) and `scripts/cal_final_score.py` (how they combine:
normalised = (score - min) / (max - min) * weight; Quality and Semantic = sum of their weighted normalised scores /
sum of their weights; Total = (4 Quality + 1 Semantic) / 5). VBench names dimensions with spaces there and with
underscores in its result files (`subject_consistency_eval_results.json`); the underscore form is used here.
"""

from __future__ import annotations

# dimension -> (min, max) of VBench's min-max normalisation (NORMALIZE_DIC).
NORMALIZE: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}

# DIM_WEIGHT: every dimension counts 1 except dynamic degree.
DIM_WEIGHT: dict[str, float] = {dim: 1.0 for dim in NORMALIZE} | {"dynamic_degree": 0.5}

QUALITY: tuple[str, ...] = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
SEMANTIC: tuple[str, ...] = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0

# The standard prompt suite: prompts/all_dimension.txt in a VBench checkout, 946 prompts, 5 videos each.
STANDARD_PROMPTS = 946
SAMPLES_PER_PROMPT = 5
