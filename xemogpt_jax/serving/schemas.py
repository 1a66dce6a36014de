"""Request bodies as pydantic models, so a bad field is a 422 that names it before any work is queued.

The chat models follow OpenAI's ``/v1/chat/completions`` request; fields we do not implement are
ignored as OpenAI-compatible servers usually do, except ``n`` (only 1, checked by the route).
Media travel as content parts: ``input_audio`` (base64 + format) and ``video_url`` (a
``data:video/...;base64,`` URL or a ``file://`` path under the server's ``--media-root``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class InputAudio(_Lenient):
    data: str = Field(description="base64 of the audio file")
    format: Literal["wav", "mp3", "flac", "ogg"]


class AudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(_Lenient):
    url: str = Field(description="data:video/<type>;base64,... or file:///path under --media-root")


class VideoPart(_Lenient):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | AudioPart | VideoPart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    @property
    def media_parts(self) -> list[AudioPart | VideoPart]:
        return [] if isinstance(self.content, str) else [p for p in self.content if not isinstance(p, TextPart)]


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)
    subtitle: str = Field(default="", description="extension: the clip's subtitle when media parts are sent")
    num_beams: int = Field(default=1, ge=1, le=16, description="extension: beam search width")


class DecodingFields(_Lenient):
    """``/v1/explain``'s decoding options (query string for uploads, JSON fields otherwise); unset = server default."""

    subtitle: str = ""
    instruction: str | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    num_beams: int | None = Field(default=None, ge=1, le=16)
    temperature: float | None = Field(default=None, gt=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    greedy: bool | None = None


class ExplainPaths(DecodingFields):
    """``/v1/explain`` with ``Content-Type: application/json``: server-side files under ``--media-root``."""

    video: str | None = None
    audio: str | None = None
