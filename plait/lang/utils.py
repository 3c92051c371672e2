"""Helpers the frontend and SGLang-style programs use: media encoding, JSONL, tracebacks."""

from __future__ import annotations

import base64
import json
import os
import traceback
from typing import Any, Iterator


def encode_image_base64(image: Any) -> str:
    """A path, URL, raw bytes, or a PIL image -> base64 of the image bytes (as sent in `image_data`)."""
    if isinstance(image, bytes):
        return base64.b64encode(image).decode()
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(image, timeout=30) as resp:
                return base64.b64encode(resp.read()).decode()
        if image.startswith("data:"):
            return image.split(",", 1)[1]
        if os.path.isfile(image):
            with open(image, "rb") as f:
                return base64.b64encode(f.read()).decode()
        return image  # already base64
    if hasattr(image, "save"):  # a PIL image
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    raise TypeError(f"cannot encode a {type(image).__name__} as an image")


def encode_video_base64(video_path: str, num_frames: int = 16) -> str:
    """Sample `num_frames` frames evenly and encode them as SGLang does: "video:" + base64 JPEGs joined by ","."""
    try:
        import cv2  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError("encoding a video needs opencv-python (pip install opencv-python-headless)") from e
    cap = cv2.VideoCapture(video_path)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if total <= 0:
        raise ValueError(f"{video_path}: no frames")
    wanted = {int(i * total / num_frames) for i in range(num_frames)}
    frames = []
    for i in range(total):
        ok, frame = cap.read()
        if not ok:
            break
        if i in wanted:
            ok, buf = cv2.imencode(".jpg", frame)
            frames.append(base64.b64encode(buf.tobytes()).decode())
    cap.release()
    return "video:" + ",".join(frames)


def read_jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def get_exception_traceback() -> str:
    return traceback.format_exc()
