"""Evaluating a volume holds labels and a rolling accumulator, never the full logit volume."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, resource, torch
from ctseg.models.segresnet import SegResNetModule

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

torch.manual_seed(0)
module = SegResNetModule(init_filters=8, roi_size=(32, 32, 32), sw_batch_size=2).eval()
image = torch.randn(1, 1, 128, 128, 128)
label = torch.randint(0, 105, (1, 1, 128, 128, 128), dtype=torch.uint8)
with torch.no_grad():  # warm up the allocator and kernels on one window
    module(image[..., :32, :32, :32])
before = rss_mb()
with torch.no_grad():
    module.validation_step({"image": image, "label": label}, 0)
print(json.dumps({"before": before, "after": rss_mb(),
                  "counted": int(module.val_dice.target_count.sum())}))
"""


def test_evaluation_memory_stays_far_below_the_logit_volume():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=600, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["counted"] == 128**3
    full_logits_mb = 105 * 128**3 * 4 / 2**20  # 880 MiB: what a full-volume evaluation holds
    # Measured: ~300 MiB, of which the rolling (105, 32, 128, 128) accumulator is 220 MiB; MONAI's
    # full-volume evaluation adds the 880 MiB of logits and as much again for their softmax.
    assert measured["after"] - measured["before"] < 0.5 * full_logits_mb, measured
