"""Convert the zoo's newer networks (issue 9) at their smallest input with B spanning almost
the whole network, and print the verification figures and the CPU time of each.

    .venv/bin/python benchmarks/zoo_new_networks.py [NAME ...]

Each conversion costs 40 s to a few minutes of CPU, more than a test may (the test budget,
tests/bundle_cache.py), so this script is their check: it exits 1 if any conversion fails
or its figures exceed the zoo tests' bounds (forward <= 1e-4, gradients <= 1e-3).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

# name -> (input size, first cut right after the stem, second cut right before the head)
CASES = {
    "vgg16": (32, "block1_pool", "block5_pool"),
    "efficientnetb0": (32, "stem_activation", "top_activation"),
    "mobilenetv3small": (32, "multiply", "multiply_17"),
}


def convert(name: str, size: int, cuts: tuple[str, str], out: Path) -> dict:
    from converters.bundle import write_bundle
    from converters.models import load_model
    from shared_schema import SGDSpec

    model, from_logits = load_model(name, input_size=size)
    start = time.process_time()
    write_bundle(
        model,
        list(cuts),
        out,
        model_name=name,
        from_logits=from_logits,
        optimizer=SGDSpec(learning_rate=0.01, momentum=0.9),
    )
    report = json.loads((out / "report.json").read_text())
    report["cpu_seconds"] = time.process_time() - start
    return report


def main(names: list[str]) -> int:
    failed = 0
    for name in names or list(CASES):
        size, *cuts = CASES[name]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                report = convert(name, size, tuple(cuts), Path(tmp) / "bundle")
            except Exception as exc:  # report and go on with the next network
                print(f"{name}: FAILED: {exc}")
                failed += 1
                continue
        v = report["verification"]
        ok = v["forward_train_rel_err"] <= 1e-4 and v["max_param_grad_rel_err"] <= 1e-3
        failed += not ok
        print(
            f"{name} {size}px {cuts[0]}..{cuts[1]}: params {report['params']}, forward "
            f"{v['forward_train_rel_err']:.1e} (float32 {v['float32'].get('forward_train_rel_err', 0):.1e}, "
            f"Keras float32 {v.get('keras_float32_forward_rel_err') or 0:.1e}), max gradient "
            f"{v['max_param_grad_rel_err']:.1e}, {report['cpu_seconds']:.0f} CPU s"
            f"{'' if ok else '  OVER BOUNDS'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
