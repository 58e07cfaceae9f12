"""OpenAI's chat-completions wire format: request parsing, responses, stream chunks and error objects.

Plain functions over dicts (no web framework here), so the rules are testable on their own:

* ``messages``: one image per request, as an ``image_url`` part whose URL is a ``data:image/...;base64,``
  URL (the server never fetches a URL). The prompt is the text of the messages in order, text parts joined
  by a space (one user message ``"Question: what is this? Answer:"`` is that exact prompt; none: caption).
* ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (absent: the bundle's default, greedy for
  BLIP-2; 0: greedy; > 0: sampling at that temperature), ``top_p`` (< 1 samples unless temperature is 0),
  ``seed``, ``n`` (choices; choice ``i`` samples with seed ``seed + i``), ``stop`` (up to 4 strings),
  ``stream`` and ``stream_options.include_usage``.
* Beyond OpenAI (send with the client's ``extra_body``): ``num_beams`` (beam search), ``top_k``,
  ``repetition_penalty``, ``min_tokens``.
* Refused with a 400 naming the field: ``frequency_penalty``/``presence_penalty`` other than 0,
  ``logprobs``, ``tools``, a ``response_format`` other than text.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 4
MAX_N = 16


class ApiError(Exception):
    """An HTTP error answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    image: bytes
    image_type: str
    prompt: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    num_beams: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    def overrides(self, choice: int = 0) -> dict[str, Any]:
        """Keyword overrides of the bundle's generation config (``Blip2Runtime.generation_config``)."""
        o: dict[str, Any] = {"max_new_tokens": self.max_tokens, "num_beams": self.num_beams, "top_k": self.top_k,
                             "repetition_penalty": self.repetition_penalty, "min_new_tokens": self.min_tokens}
        sample = None
        if self.temperature is not None:
            sample = self.temperature > 0
            if sample:
                o["temperature"] = self.temperature
        if self.top_p is not None and self.temperature != 0:
            o["top_p"] = self.top_p
            if self.top_p < 1:
                sample = True
        if sample is not None:
            o["do_sample"] = sample
        if self.seed is not None:
            o["seed"] = self.seed + choice
        return o


def _int(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer (got {json.dumps(v)[:40]})", param=name)
    if v < lo or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ApiError(400, f"'{name}' must be {rng} (got {v})", param=name)
    return v


def _float(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a number (got {json.dumps(v)[:40]})", param=name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}] (got {v})", param=name)
    return float(v)


def decode_data_url(url: Any, param: str) -> tuple[bytes, str]:
    """The bytes and media type of a ``data:image/...;base64,...`` URL; any other URL is refused."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, "an image_url part needs 'url': a data:image/...;base64,... URL", param=param)
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:20] if ":" in url else "a plain path"
        raise ApiError(400, f"image URLs are not fetched (got {scheme}): send the image inline as a "
                            "data:image/...;base64,... URL", param=param, code="image_url_not_inline")
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise ApiError(400, "a data: image URL must be base64: data:image/png;base64,...", param=param)
    media = head[:-len(";base64")].split(";")[0].strip().lower()
    if not media.startswith("image/"):
        raise ApiError(400, f"a data: URL of type {media or 'none'!r} is not an image (want image/png, "
                            "image/jpeg, ...)", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image's data: URL is not valid base64", param=param) from None
    if not raw:
        raise ApiError(400, "the image's data: URL is empty", param=param)
    return raw, media


def _content(msg: dict, i: int, texts: list[str], images: list[tuple[bytes, str]]) -> None:
    content = msg.get("content")
    where = f"messages[{i}].content"
    if content is None:
        return
    if isinstance(content, str):
        texts.append(content)
        return
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", param=where)
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise ApiError(400, f"{p} must be an object with a 'type'", param=p)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{p}.text must be a string", param=p)
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            images.append(decode_data_url(url, f"{p}.image_url.url"))
        else:
            raise ApiError(400, f"{p}: part type {json.dumps(kind)[:40]} is not supported (text, image_url)",
                           param=p)


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body; :class:`ApiError` (400) says what is wrong."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    texts: list[str] = []
    images: list[tuple[bytes, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be an object with a role of system, developer, user or "
                                "assistant", param=f"messages[{i}]")
        _content(msg, i, texts, images)
    if len(images) != 1:
        raise ApiError(400, f"a request holds exactly one image (an image_url part); got {len(images)}",
                       param="messages")
    for name, why in (("frequency_penalty", "use repetition_penalty (extra_body)"), ("presence_penalty", "")):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported{': ' + why if why else ''}", param=name)
    if body.get("logprobs"):
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "tools and functions are not supported", param="tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    req = ChatRequest(
        model=model, image=images[0][0], image_type=images[0][1], prompt=" ".join(texts),
        max_tokens=max_tokens, temperature=_float(body, "temperature", 0.0, 2.0),
        top_p=_float(body, "top_p", 0.0, 1.0, lo_open=True), top_k=_int(body, "top_k", 0),
        seed=_int(body, "seed", -(2 ** 62), 2 ** 62), n=_int(body, "n", 1, MAX_N) or 1,
        num_beams=_int(body, "num_beams", 1), repetition_penalty=_float(body, "repetition_penalty", 0.0, 100.0,
                                                                        lo_open=True),
        min_tokens=_int(body, "min_tokens", 0), stop=stops, stream=stream,
        include_usage=bool(opts.get("include_usage", False)),
    )
    if req.num_beams and req.num_beams > 1:
        if req.n > 1:
            raise ApiError(400, "'n' > 1 with num_beams > 1 is not supported: ask for one choice", param="n")
        if req.overrides().get("do_sample"):
            raise ApiError(400, "beam search does not sample: send temperature 0 (or none) with num_beams",
                           param="num_beams")
    if req.min_tokens is not None and req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise ApiError(400, "'min_tokens' must not exceed max_tokens", param="min_tokens")
    return req


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class Completion:
    id: str
    model: str
    prompt_tokens: int
    choices: list[Choice] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict:
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens * len(self.choices), "completion_tokens": done,
                "total_tokens": self.prompt_tokens * len(self.choices) + done}

    def response(self) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(self.choices)],
                "usage": self.usage()}

    def chunk(self, index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
