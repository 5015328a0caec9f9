"""Write the synthetic, non-IID CSVs of the federated-averaging example (seeded: same files every run).

Both pods follow y = 3*x1 - 2*x2 + 1 + noise, but their inputs come from different
regions: pod A's x1 is mostly negative and its x2 positive, pod B the other way round
with a wider spread, and more rows.

    python examples/data/fedavg/generate.py
"""

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601
NOISE_SD = 0.25
# pod: (rows, (x1 mean, x1 sd), (x2 mean, x2 sd))
PODS = {
    "pod_a": (300, (-1.0, 0.6), (1.5, 0.5)),
    "pod_b": (420, (1.5, 1.0), (-1.0, 0.8)),
}


def main() -> None:
    rng = random.Random(SEED)  # noqa: S311 (synthetic data, not cryptography)
    for pod, (rows, (m1, s1), (m2, s2)) in PODS.items():
        out_dir = HERE / pod
        out_dir.mkdir(exist_ok=True)
        out_dir.chmod(0o755)  # the sandbox runs as uid 10001
        path = out_dir / "samples.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["x1", "x2", "y"])
            for _ in range(rows):
                x1 = rng.gauss(m1, s1)
                x2 = rng.gauss(m2, s2)
                y = 3 * x1 - 2 * x2 + 1 + rng.gauss(0, NOISE_SD)
                writer.writerow([f"{x1:.4f}", f"{x2:.4f}", f"{y:.4f}"])
        path.chmod(0o644)
        print(f"{path.relative_to(HERE)}: {rows} rows")


if __name__ == "__main__":
    main()
