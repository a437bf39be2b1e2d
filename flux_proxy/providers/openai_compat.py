"""Any OpenAI Images server as an upstream (OpenAI itself, Together-style hosts,
another flux-proxy). What the upstream can do is declared in the model's config
``capabilities``; the middlewares emulate the rest.

Model ``options``:

- ``response_format``: what to ask the upstream for (``b64_json`` or ``url``);
  unset sends nothing (GPT-image models reject the field and always return base64).

``seed`` is not part of OpenAI's API (api.openai.com refuses it with a 400), so
it is sent only when the model's ``capabilities`` say ``accepts_seed: true``.
"""

from __future__ import annotations

from typing import Any, Literal

from flux_proxy.b64 import InvalidBase64
from flux_proxy.capabilities import Capabilities
from flux_proxy.config import ProviderConfig
from flux_proxy.errors import UpstreamError
from flux_proxy.hookspecs import RegisterProvider, hookimpl
from flux_proxy.native_body import NativeBody
from flux_proxy.providers.base import ModelEntry, ModelSpec, ProviderOptions, UpstreamProvider
from flux_proxy.schema import GeneratedImage, ImageJob
from flux_proxy.upstream import Upstream


class OpenAIOptions(ProviderOptions):
    # What to ask the upstream for; None sends nothing (GPT-image rejects the field).
    response_format: Literal["b64_json", "url"] | None = None


# Conservative defaults: what every OpenAI Images server does. Declare more in config.
DEFAULT_SPEC = ModelSpec(
    capabilities=Capabilities(max_images_per_call=1, output_formats=("png",), accepts_seed=False)
)


class OpenAICompatibleProvider(UpstreamProvider[ModelSpec, OpenAIOptions]):
    name = "openai"
    # No key unless the entry names its variable: another flux-proxy may need none.
    key_env = None
    base_url = "https://api.openai.com/v1"
    options_model = OpenAIOptions

    def model_spec(self, upstream_model: str, options: OpenAIOptions) -> ModelSpec:
        return DEFAULT_SPEC  # any model name: the upstream knows its own models

    def description(self, model: ProviderConfig) -> str:
        return f"{model.upstream_model or 'a model'} via an OpenAI-compatible upstream"

    async def run(
        self, job: ImageJob, entry: ModelEntry[ModelSpec, OpenAIOptions], upstream: Upstream
    ) -> list[GeneratedImage]:
        url = f"{entry.base_url}/images/generations"
        response = await upstream.request("POST", url, json=self._body(job, entry.options))
        if response.status_code != 200:
            raise upstream.error(response)
        # The images' base64 stays the answer's bytes (checked strict base64 on the
        # way): passed on as it is, never a str.
        payload = upstream.json(response, "request", keep_base64="b64_json")
        return await self._images(payload, job)

    def _body(self, job: ImageJob, options: OpenAIOptions) -> dict[str, Any]:
        route = job.target
        native = NativeBody(job)
        native.body["model"] = route.upstream_model
        native.put("prompt", job.request.prompt)
        if job.n != 1:
            native.put("n", job.n)
        if job.width and job.height:
            native.body["size"] = f"{job.width}x{job.height}"
        # The upstream's default format (listed first) needs no field; others do.
        if job.output_format and job.output_format != route.capabilities.output_formats[0]:
            native.put("output_format", job.output_format)
        if job.output_compression is not None:
            native.put("output_compression", job.output_compression)
        if options.response_format:
            native.body["response_format"] = options.response_format
        if job.seed is not None:
            native.put("seed", job.seed)
        native.put_fields()
        return native.body

    async def _images(self, payload: Any, job: ImageJob) -> list[GeneratedImage]:
        items = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items:
            raise UpstreamError("The openai upstream answered without any images.")
        sent_seed = job.target.capabilities.accepts_seed
        images = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise UpstreamError("The openai upstream answered with a malformed image entry.")
            revised = item.get("revised_prompt")
            seed = None if job.seed is None or not sent_seed else job.seed + index
            text = item.get("b64_json")
            if isinstance(text, bytes | str):
                # Kept as the upstream's text: passed on as it is unless a layer needs
                # the bytes (fetcher.ensure_data decodes it then). Bytes are checked
                # base64 already; a str is a value the upstream wrote with escapes (such
                # as \/) or that is no base64, read by the JSON parser, checked later.
                images.append(
                    GeneratedImage(
                        b64=_ascii(text),
                        b64_checked=isinstance(text, bytes),
                        seed=seed,
                        revised_prompt=revised,
                    )
                )
            elif isinstance(item.get("url"), str):
                # A data: URI (some compatible hosts inline the image) is kept as text too.
                image = await self.image_at(item["url"], seed)
                image.revised_prompt = revised
                images.append(image)
            else:
                raise UpstreamError("The openai upstream sent an image with neither url nor data.")
        return images


def _ascii(text: bytes | str) -> bytes:
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidBase64() from None


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("openai", OpenAICompatibleProvider)
