"""`python -m ctseg.export ckpt=<.ckpt|model.pt> formats=[torchscript,onnx] output=<dir>`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ctseg.config import CONFIG_DIR, plain
from ctseg.errors import ConfigError, run_cli
from ctseg.export.exporter import export_model, sample_window
from ctseg.models.loading import load_model


def summary(manifest: Mapping[str, Any]) -> list[str]:
    """One line per format: file and parity figures, or why it was skipped."""
    lines = []
    for fmt, entry in manifest["formats"].items():
        p = entry["parity"]
        lines.append(f"{fmt:12s} {entry['file']:20s} max |logit diff| {p['max_abs_diff']:.3g}, "
                     f"argmax agreement {p['argmax_agreement']:.5f}")
    lines += [f"{fmt:12s} skipped: {reason}" for fmt, reason in manifest.get("skipped", {}).items()]
    return lines


def log_entry(output: Path) -> tuple[str, ...]:
    """The entry of `output` holding this run's Hydra log folder (`hydra.run.dir`), which a
    re-export keeps; none outside a Hydra run or when the logs go elsewhere."""
    if not HydraConfig.initialized():
        return ()
    logs = Path(HydraConfig.get().runtime.output_dir).resolve()
    if not logs.is_relative_to(output.resolve()) or logs == output.resolve():
        return ()
    return (logs.relative_to(output.resolve()).parts[0],)


def run(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Export `cfg.ckpt` to `cfg.formats` in `cfg.output`; the manifest (export.json)."""
    formats = plain(cfg["formats"])
    if isinstance(formats, str):
        formats = [formats]
    model = load_model(str(cfg["ckpt"]), plain(cfg.get("model")) or {},
                       plain(cfg.get("data")) or {})
    if model.net is None:
        raise ConfigError(f"ckpt={cfg['ckpt']} is an export folder already; give the .ckpt or "
                          "model.pt it was exported from")
    sample = cfg.get("sample")
    window = sample_window(model, Path(str(sample)) if sample else None)
    output = Path(str(cfg["output"]))
    return export_model(model, list(formats), output, window,
                        source=str(cfg["ckpt"]), opset=int(cfg["opset"]),
                        thresholds=plain(cfg.get("parity")), device=str(cfg.get("device", "cpu")),
                        max_batch=int(cfg["max_batch"]), keep=log_entry(output))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    """Export, check parity, print one line per format."""
    manifest = run(cfg)
    print("\n".join(summary(manifest)))
    print(f"written to {cfg.output} (export.json describes it for predict.py ckpt={cfg.output})")


def cli() -> None:
    """Console entry point (`ctseg-export`, `python -m ctseg.export`)."""
    run_cli(main, "python -m ctseg.export")


if __name__ == "__main__":
    cli()
