"""A thousand concurrent streaming connections through the whole P/D stack: every one gets its
SSE stream through to `data: [DONE]`, and no KV block is left behind."""
import asyncio
import json
import resource

N = 1000


async def one_stream(port, i, opened):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "stories260K", "prompt": f"Tale {i}: once upon a time", "max_tokens": 24,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    opened.append(i)
    data = b""
    while b"data: [DONE]" not in data:
        chunk = await asyncio.wait_for(reader.read(65536), 120)
        if not chunk:
            break
        data += chunk
    writer.close()
    head = data.split(b"\r\n", 1)[0]
    return head, data.count(b'"text_completion"'), b"data: [DONE]" in data


async def run(port):
    opened = []
    results = await asyncio.gather(*(one_stream(port, i, opened) for i in range(N)))
    return opened, results


def test_thousand_concurrent_streams(pd, no_leaks):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    opened, results = asyncio.run(run(pd.http_port))
    assert len(opened) == N
    bad = [r for r in results if not (r[0].startswith(b"HTTP/1.1 200") and r[2])]
    assert not bad, bad[:3]
    assert all(r[1] >= 24 for r in results)  # every token arrived as its own chunk
