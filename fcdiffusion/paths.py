"""Where the downloaded weights go, and the one message that tells a user how to get them."""
from __future__ import annotations

SD_CHECKPOINT = "models/v2-1_512-ema-pruned.ckpt"
OPENCLIP_CHECKPOINT = "CLIP-ViT-H-14/open_clip_pytorch_model.bin"
INIT_CHECKPOINT = "models/fcdiffusion_init.ckpt"

DOWNLOAD_HELP = f"""\
The real weights are not part of this repository. Download them and place them as follows:
  - Stable Diffusion 2.1-base: v2-1_512-ema-pruned.ckpt from huggingface.co/stabilityai/stable-diffusion-2-1-base
      -> {SD_CHECKPOINT}
  - OpenCLIP ViT-H-14: open_clip_pytorch_model.bin from huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K
      -> {OPENCLIP_CHECKPOINT}
  - then build the initial FCDiffusion checkpoint:
      python tool_add_control_sd21.py {SD_CHECKPOINT} {INIT_CHECKPOINT}
To try the whole pipeline without any download, use the tiny configs instead: `make quickstart`, or
  python fcdiffusion_train.py --config configs/model_config_tiny.yaml (after the quickstart has built its files)."""
