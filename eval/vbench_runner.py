"""Run one VBench dimension with the official `vbench` package: the script `cinedit eval vbench score` starts.

It runs under the Python given by --vbench-python, whose environment has `vbench` (with its pinned transformers /
numpy and its weights) and need not have cinedit, so it imports nothing from cinedit and keeps to Python 3.8 syntax.
VBench writes `<output>/<dimension>_eval_results.json`: {dimension: [mean score, [{"video_path", "video_results"}]]}.

Exit codes: 0 done, 3 no `vbench` in this environment, 4 no prompt-suite file, anything else VBench's own failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

NO_VBENCH, NO_FULL_INFO = 3, 4


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="only check that `vbench` imports; print its version")
    p.add_argument("--videos", help="folder of sampled videos")
    p.add_argument("--dimension", help="one VBench dimension, e.g. subject_consistency")
    p.add_argument("--output", help="folder for VBench's result files")
    p.add_argument("--full-info", default="", help="VBench_full_info.json (default: the one inside the package)")
    p.add_argument("--mode", default="vbench_standard", help="vbench_standard or custom_input")
    p.add_argument("--device", default="cuda")
    p.add_argument("--local", action="store_true", help="load VBench's weights from its local cache only")
    args = p.parse_args(argv)

    # Python puts this script's folder first on sys.path, and cinedit's own vbench.py lives there: without this,
    # `import vbench` would find that module instead of the VBench package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if importlib.util.find_spec("vbench") is None:
        print(f"no `vbench` package in the environment of {sys.executable}", file=sys.stderr)
        return NO_VBENCH
    import vbench  # optional (VBench's own environment), and only after sys.path is fixed above

    packaged = os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
    if args.check:
        # One line for `score`: the version, and the prompt-suite file the package ships ("" if none).
        found = packaged if os.path.isfile(packaged) else ""
        print(json.dumps({"version": getattr(vbench, "__version__", "unknown"), "full_info": found}))
        return 0
    full_info = args.full_info or packaged
    if args.mode == "vbench_standard" and not os.path.isfile(full_info):
        print(f"VBench's prompt-suite file {full_info} does not exist (pass --full-info)", file=sys.stderr)
        return NO_FULL_INFO
    # VBench's own CLI passes a torch.device; vbench has imported torch by now, so this costs nothing.
    torch = sys.modules.get("torch")
    device = torch.device(args.device) if torch is not None else args.device
    # Releases before 0.1.2 have no `mode` argument; pass it only when it is not their behaviour anyway.
    extra = {"mode": args.mode} if args.mode != "vbench_standard" else {}
    bench = vbench.VBench(device, full_info, args.output)
    bench.evaluate(
        videos_path=args.videos, name=args.dimension, dimension_list=[args.dimension], local=args.local, **extra
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
