"""Clips from request media: base64 content parts, ``data:`` URLs, uploads, and paths confined to ``--media-root``.

Everything is decoded with :func:`xemogpt_jax.explainer.read_clip` from a private temporary
folder, so an upload and a file on disk go through the same decoder and the same
:class:`~data_pipelines.media.MediaError` reasons.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from data_pipelines import media
from xemogpt_jax import explainer as explainer_lib
from xemogpt_jax.explainer import Clip
from xemogpt_jax.serving.errors import RequestError
from xemogpt_jax.serving.schemas import AudioPart, VideoPart


def decode_base64(data: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: not valid base64") from None
    if not raw:
        raise RequestError(400, f"{where}: empty")
    return raw


def under_root(path: str, media_root: Path | None, where: str) -> Path:
    """``path`` (absolute, or relative to the root) if it lies inside ``media_root`` after resolving links."""
    if media_root is None:
        raise RequestError(403, f"{where}: this server reads no server-side files (start it with --media-root)")
    root = media_root.resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise RequestError(403, f"{where}: {path} is outside --media-root")
    return resolved


def _video_source(part: VideoPart, media_root: Path | None) -> bytes | Path:
    url = part.video_url.url
    where = "video_url"
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not header[5:].startswith(("video/", "application/octet-stream")):
            raise RequestError(400, f"{where}: expected data:video/<type>;base64,<data>")
        return decode_base64(payload, where)
    parts = urlsplit(url)
    if parts.scheme == "file":
        return under_root(unquote(parts.path), media_root, where)
    raise RequestError(400, f"{where}: only data: and file:// URLs are accepted, not {parts.scheme or url!r}")


def _materialise(source: bytes | Path, folder: Path, name: str) -> Path:
    if isinstance(source, Path):
        return source
    path = folder / name
    path.write_bytes(source)
    return path


def read_media(video: bytes | Path | None, audio: bytes | Path | None, *, subtitle: str, instruction: str | None,
               frame_size: int, labels: tuple[str, str] = ("video", "audio")) -> Clip:
    """Decode a clip from bytes or files; a RequestError(400) names the part (``labels``) that failed."""
    with tempfile.TemporaryDirectory(prefix="xemogpt-serve-") as folder:
        video_path = None if video is None else _materialise(video, Path(folder), "video")
        audio_path = None if audio is None else _materialise(audio, Path(folder), "audio")
        try:
            return explainer_lib.read_clip("request", video_path, audio_path, subtitle, frame_size=frame_size,
                                           instruction=instruction)
        except media.MediaError as error:
            label = labels[0] if audio_path is None or error.path != str(audio_path) else labels[1]
            raise RequestError(400, f"{label}: {error.problem}") from None


def clip_from_parts(parts: list[AudioPart | VideoPart], *, subtitle: str, instruction: str, frame_size: int,
                    media_root: Path | None) -> Clip:
    """The clip a chat message's media parts describe (at most one video and one audio)."""
    videos = [p for p in parts if isinstance(p, VideoPart)]
    audios = [p for p in parts if isinstance(p, AudioPart)]
    if len(videos) > 1 or len(audios) > 1:
        raise RequestError(400, "a clip has at most one video_url part and one input_audio part")
    video = _video_source(videos[0], media_root) if videos else None
    audio = decode_base64(audios[0].input_audio.data, "input_audio") if audios else None
    return read_media(video, audio, subtitle=subtitle, instruction=instruction, frame_size=frame_size,
                      labels=("video_url", "input_audio"))
