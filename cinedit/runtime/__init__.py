"""cinedit.runtime: the floor every subsystem and command shares. Nothing here imports a higher layer.

- `dist`: process group, devices (`resolve_device`), collectives, autocast
- `rng`: seeding and RNG state
- `files`: atomic file writes (`atomic_path`, `write_text`, `write_json`), the run directory's `config.json`
- `logs`: metrics.jsonl + TensorBoard, the progress bar
- `checkpoint`: atomic checkpoint folders and the sharded checkpoint format
- `layout`: the dp x cp process layout
- `booster`: the booster / plugin built from `ParallelConfig` (torch, ColossalAI DDP / ZeRO / Hybrid)
- `ema`: the EMA of a model's weights
- `training`: run-directory checks and the training loop both trainers run
- `modelio`: model folders (`config.json` + `model.safetensors`) and the state-dict adapter
- `cli`: command groups and the train-command front end

The package itself imports nothing, so loading one helper (e.g. `modelio` from a model's loader) does not
pull in `torch.distributed` users.
"""
