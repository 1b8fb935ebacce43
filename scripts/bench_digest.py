"""What verifying a snapshot costs at load: the SHA-256 of a WRN-28-10 snapshot file (the largest model snapens
ships), best of 3 reads from the page cache, in ms per MiB. Every reader computes it once per file (the logits cache
and the copy check need it too), then compares it with the run's manifest.json.

    python scripts/bench_digest.py
"""

import tempfile
import time
from pathlib import Path

from snapens.files import file_digest
from snapens.models import WideResNet
from snapens.snapshots import save_snapshot

with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "snapshots" / "cycle_01.safetensors"
    path.parent.mkdir()
    save_snapshot(path, WideResNet(depth=28, widen_factor=10, dropout=0.0, num_classes=10), {"cycle": 1})
    size = path.stat().st_size / 2**20
    file_digest(path)  # into the page cache
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        file_digest(path)
        seconds.append(time.perf_counter() - start)
    print(f"WRN-28-10 snapshot, {size:.1f} MiB: SHA-256 in {1000 * min(seconds):.0f} ms, "
          f"{1000 * min(seconds) / size:.2f} ms per MiB (best of 3)")
