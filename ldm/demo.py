"""Where the shipped demo model lives (trained by this project on ldm.data.shapes; see README)."""
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_DIR / "models" / "demo"
DEMO_CONFIG = DEMO_DIR / "config.yaml"
DEMO_CHECKPOINT = DEMO_DIR / "model.safetensors"
DEMO_EMBEDDING = DEMO_DIR / "purple-star.pt"
DEMO_INPAINTING_CONFIG = DEMO_DIR / "inpainting.yaml"
DEMO_INPAINTING_CHECKPOINT = DEMO_DIR / "inpainting.safetensors"
