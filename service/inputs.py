"""Request bodies → image files: a raw image, multipart `file` parts, or JSON base64 instances."""

from __future__ import annotations

import binascii
from base64 import b64decode

from litestar import Request
from litestar.datastructures import UploadFile
from pydantic import ValidationError

from service.errors import BadInputError, UnsupportedMediaTypeError
from service.schemas import PredictRequest

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif", "image/tiff")

async def read_images(request: Request) -> list[bytes]:
    """The image files a predict request carries, in order; 4xx for anything else."""
    media_type = request.content_type[0]
    if media_type in IMAGE_TYPES:
        images = [await request.body()]
    elif media_type == "multipart/form-data":
        images = await _multipart_files(request)
    elif media_type == "application/json":
        images = _json_instances(await request.body())
    else:
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Type {media_type or '(none)'!r}: send one image as "
            f"{', '.join(IMAGE_TYPES)}, several as multipart/form-data 'file' parts, "
            "or application/json {\"instances\": [{\"b64\": ...}]}"
        )
    if not images or not all(images):
        raise BadInputError("empty image: send the image file's bytes")
    return images


NO_FILENAME = "a multipart part has no filename: send each image as a 'file' part with a filename"


async def _multipart_files(request: Request) -> list[bytes]:
    try:
        form = await request.form()
    except UnicodeDecodeError:  # Litestar reads a part without a filename as UTF-8 text
        raise BadInputError(NO_FILENAME) from None
    parts = form.getall("file") if "file" in form else []
    if not parts:
        raise BadInputError("multipart body has no 'file' parts: send each image as a 'file'")
    files = [part for part in parts if isinstance(part, UploadFile)]
    if len(files) < len(parts):
        raise BadInputError(NO_FILENAME)
    return [await part.read() for part in files]


def _json_instances(body: bytes) -> list[bytes]:
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise BadInputError(
            f"bad JSON body at {where}: {first['msg']}; "
            'send {"instances": [{"b64": "<base64 image>"}]}'
        ) from None
    try:
        return [b64decode(instance.b64, validate=True) for instance in request.instances]
    except binascii.Error:
        raise BadInputError("an instance's 'b64' is not valid base64") from None
