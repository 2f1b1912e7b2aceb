"""The framework baseline for benchmarks/front_door.py: a bare Litestar endpoint on the service's
server stack (uvicorn, httptools, uvloop) that reads the body and answers a small JSON, with no
decoding, no model and no middleware.

Run: python benchmarks/bare_litestar.py PORT
"""

from __future__ import annotations

import sys

import uvicorn
from litestar import Litestar, Request, get, post


@post("/", status_code=200)
async def answer(request: Request) -> dict[str, int]:
    return {"bytes": len(await request.body())}


@get("/")
async def ready() -> dict[str, bool]:
    return {"ready": True}


if __name__ == "__main__":
    uvicorn.run(Litestar([answer, ready]), host="127.0.0.1", port=int(sys.argv[1]),
                log_level="warning", access_log=False)
