"""Which operation rounds differently on another CPU? (README, "Machine sensitivity")

    python vidla/rounding_probe.py        # about 30 CPU-seconds

Runs one forward and backward pass of three rungs (meanP+TP, TP+MST, VidLA) on one fixed batch,
once as this machine runs it and once under each of three settings that another x86 CPU may
differ in: ATen's vectorised kernels at AVX2 instead of AVX-512 (ATEN_CPU_CAPABILITY=avx2), MKL's
matrix products at AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2), and two torch threads instead of one.
For each setting and rung it prints how many of the recorded tensors (every module's output, the
loss, every gradient) differ in any bit, the first module (in forward order) whose output
differs, and the largest difference of the loss. Each setting runs in its own process, because
these variables are read when torch loads.
"""

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vidla import train as V  # noqa: E402

RUNGS = ("meanP+TP", "TP+MST", "VidLA")
SETTINGS = {"ATen kernels at AVX2": {"ATEN_CPU_CAPABILITY": "avx2"},
            "MKL at AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
            "2 torch threads": {"PROBE_THREADS": "2"}}


def dump(path: str) -> None:
    """One forward/backward per rung on a fixed batch; every module output and grad to `path`."""
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
    cfg = V.Config()
    torch.manual_seed(0)
    clip = V.make_clip(cfg)
    batch = V.make_clips(np.random.default_rng([0, 2]), [1, 2, 4, 4] * 8, cfg)
    out = {}
    for name in RUNGS:
        torch.manual_seed(1)
        model = V.build_rung(name, copy.deepcopy(clip), cfg)
        with torch.no_grad():  # away from the zero init, so every new module is in play
            model.temporal_pos.normal_(0, 0.1)
            for attn in (model.local_attn or []) if name == "VidLA" else []:
                attn.out_proj.weight.normal_(0, 0.1)
        order = []

        def hook(module, args, output, key, name=name, order=order):
            output = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(output):
                out[f"{name}|fwd{len(order):03d}|{key}"] = output.detach().numpy().copy()
                order.append(key)

        for key, module in model.named_modules():
            if key:
                module.register_forward_hook(lambda m, a, o, k=key: hook(m, a, o, k))
        v = model.encode_video(batch["video"])  # (B, D)
        c, s = model.encode_text(torch.cat([batch["caption"], batch["subtitle"]])).chunk(2)
        loss = V.vidla_loss(v, s, c, V.logit_scale_of(model.clip))
        loss.backward()
        out[f"{name}|loss"] = loss.detach().numpy()
        for key, p in model.named_parameters():
            if p.grad is not None:
                out[f"{name}|grad|{key}"] = p.grad.numpy().copy()
    np.savez(path, **out)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for label, env in {"this machine": {}, **SETTINGS}.items():
            files[label] = f"{tmp}/{len(files)}.npz"
            subprocess.run([sys.executable, __file__, "--dump", files[label]], check=True,
                           env={**os.environ, **env})
        base = np.load(files["this machine"])
        print("| setting | rung | tensors that differ | first module output that differs "
              "| loss difference |")
        print("|---|---|---|---|---|")
        for label in SETTINGS:
            other = np.load(files[label])
            for rung in RUNGS:
                keys = [k for k in base.files if k.startswith(rung + "|")]
                diff = [k for k in keys if not np.array_equal(base[k], other[k])]
                fwd = sorted(k for k in diff if "|fwd" in k)
                first = fwd[0].split("|")[-1] if fwd else "none (only gradients)"
                dloss = float(np.abs(base[f"{rung}|loss"] - other[f"{rung}|loss"]))
                print(f"| {label} | {rung} | {len(diff)}/{len(keys)} | {first} | {dloss:.1e} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--dump":
        dump(sys.argv[2])
    else:
        main()
