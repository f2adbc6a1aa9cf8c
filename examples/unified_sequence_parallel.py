"""Text-to-video with Wan2.1-T2V-14B on several GPUs, the DiT's video tokens split across them (USP).

    torchrun --standalone --nproc_per_node=8 examples/unified_sequence_parallel.py

Every rank loads the models (only rank 0 downloads, the others wait for it) and makes the same
call with the same seed; the ranks compute identical latents and rank 0 writes the video.
See docs/multi_gpu.md.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from tqdm import tqdm

from wan_runtime import ModelConfig, WanVideoPipeline, save_video

MODEL_ID = "Wan-AI/Wan2.1-T2V-14B"
PROMPT = ("A red fox trots through fresh snow in a birch forest at sunrise, its breath steaming in the cold "
          "air; low golden light, shallow depth of field, the camera tracking beside it.")
NEGATIVE_PROMPT = ("overexposed, static, blurry details, subtitles, worst quality, low quality, JPEG artifacts, "
                   "deformed, extra limbs, messy background")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pipe = WanVideoPipeline.from_pretrained(
        torch_dtype=torch.bfloat16,
        device="cuda",  # each rank takes GPU LOCAL_RANK
        use_usp=True,
        model_configs=[
            ModelConfig(model_id=MODEL_ID, origin_file_pattern="diffusion_pytorch_model*.safetensors"),
            ModelConfig(model_id=MODEL_ID, origin_file_pattern="models_t5_umt5-xxl-enc-bf16.pth"),
            ModelConfig(model_id=MODEL_ID, origin_file_pattern="Wan2.1_VAE.pth"),
        ],
    )
    first = dist.get_rank() == 0
    video = pipe(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, seed=0, tiled=True,
                 progress_bar_cmd=tqdm if first else (lambda steps: steps))
    if first:
        logging.getLogger(__name__).info("wrote %s", save_video(video, "video_usp.mp4", fps=15, quality=5))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
