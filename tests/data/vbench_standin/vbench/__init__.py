"""A stand-in for the `vbench` package: the same entry point (`VBench(device, full_info, output).evaluate(...)`) and
the same result file, `<output>/<name>_eval_results.json` = {dimension: [mean, [{"video_path", "video_results"}]]}.

It scores nothing: every video of a dimension gets the score given for it in the JSON file named by the environment
variable VBENCH_STANDIN_SCORES ({dimension: score}). Tests put this folder on PYTHONPATH of the scoring subprocess.
"""

import json
import os

__version__ = "0.0-standin"


class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.device, self.full_info_dir, self.output_path = device, full_info_dir, output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, dimension_list=None, local=False, **kwargs):
        assert dimension_list == [name], "cinedit runs one dimension per call, named after it"
        with open(os.environ["VBENCH_STANDIN_SCORES"]) as f:
            score = json.load(f)[name]
        videos = sorted(v for v in os.listdir(videos_path) if v.endswith(".mp4"))
        per_video = [{"video_path": os.path.join(videos_path, v), "video_results": score} for v in videos]
        with open(os.path.join(self.output_path, f"{name}_eval_results.json"), "w") as f:
            json.dump({name: [score, per_video]}, f)
