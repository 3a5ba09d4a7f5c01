"""One training run of the recipe for :mod:`benchmarks.gpu`: trains, then writes its loss curve.

``python -m benchmarks.gpu_worker ARGS`` takes the recipe's command line
(``mixres.integrations.llava.train``) and writes ``<output_dir>/losses.json``
(``{"world", "engine", "losses", "seconds"}``) on the main process.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str] | None = None) -> None:
    """Run :func:`mixres.integrations.llava.train.main` and record the per-step losses."""
    from mixres.integrations.llava.train import main as train

    start = time.perf_counter()
    trainer = train(sys.argv[1:] if argv is None else argv)
    if trainer.is_world_process_zero():
        engine = "deepspeed" if trainer.is_deepspeed_enabled else "fsdp" if trainer.is_fsdp_enabled else "ddp"
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        record = {"world": trainer.args.world_size, "engine": engine, "losses": losses, "seconds": time.perf_counter() - start}
        with open(f"{trainer.args.output_dir}/losses.json", "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
