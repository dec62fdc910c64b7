#!/usr/bin/env python3
"""Conformance of `glm serve` with the official OpenAI Python client (package `openai`, v1+ API).

Usage: python openai_client.py <base_url> <api_key>
    base_url  e.g. http://127.0.0.1:8080 (the client talks to base_url + "/v1")
    api_key   the key the server was started with

Needs only `openai` and the standard library. Prints `ok - <check>` or `not ok - <check>: <why>`
for each check and a closing `openai_client: N passed, N failed` line; exits 0 only when all
passed. The test model is random: generated text is never checked for content, only for
structure and consistency (stream == non-stream when greedy, same seed == same text).
"""

import json
import sys
import traceback
import urllib.error
import urllib.request

try:
    import openai
except ImportError:  # pragma: no cover
    sys.exit("openai_client.py needs the `openai` package (pip install openai)")

TIMEOUT = 60


class CheckError(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckError(msg)


def short(s, n=120):
    s = repr(s)
    return s if len(s) <= n else s[:n] + "…"


RESULTS = {"passed": 0, "failed": 0}


def check(name):
    """Runs the decorated function at once as one check; its return value is a note."""

    def run(fn):
        try:
            note = fn()
        except CheckError as e:
            RESULTS["failed"] += 1
            print(f"not ok - {name}: {e}", flush=True)
        except openai.APIStatusError as e:
            RESULTS["failed"] += 1
            print(f"not ok - {name}: unexpected {type(e).__name__} (HTTP {e.status_code}): {e.message}", flush=True)
        except openai.APIError as e:
            RESULTS["failed"] += 1
            print(f"not ok - {name}: unexpected {type(e).__name__}: {e}", flush=True)
        except Exception:  # a bug in the check or a malformed answer
            RESULTS["failed"] += 1
            print(f"not ok - {name}: {traceback.format_exc().strip()}", flush=True)
        else:
            RESULTS["passed"] += 1
            print(f"ok - {name}" + (f" ({note})" if note else ""), flush=True)
        return fn

    return run


def http(base, method, path, key=None, body=None):
    """A raw request: (status, headers, body bytes); HTTP errors are returned, not raised."""
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def sse_frames(raw):
    """Splits a raw SSE body that must be exactly `data: <one line>\\n\\n` events."""
    frames, pos = [], 0
    cr = raw.find(b"\r")
    expect(cr == -1, f"the body contains \\r (CRLF line ends?) at byte {cr}: events must end with exactly \\n\\n")
    while pos < len(raw):
        expect(raw.startswith(b"data: ", pos), f"at byte {pos}: expected 'data: ', got {raw[pos:pos + 40]!r}")
        end = raw.find(b"\n\n", pos)
        expect(end != -1, f"at byte {pos}: the last event is not closed by a blank line: {raw[pos:pos + 80]!r}")
        line = raw[pos + 6:end]
        expect(b"\n" not in line and b"\r" not in line, f"at byte {pos}: an event spans several lines: {line[:80]!r}")
        frames.append(line)
        pos = end + 2
    return frames


def check_stream_frames(raw, model, obj, include_usage):
    """Checks the framing and the chunk sequence of one streamed response; returns the chunks."""
    frames = sse_frames(raw)
    expect(len(frames) >= 2, f"only {len(frames)} events")
    expect(frames[-1] == b"[DONE]", f"the last event is {frames[-1][:80]!r}, not [DONE]")
    expect(frames.count(b"[DONE]") == 1, "more than one [DONE]")
    chunks = []
    for f in frames[:-1]:
        try:
            chunks.append(json.loads(f))
        except ValueError as e:
            raise CheckError(f"an event is not JSON ({e}): {f[:120]!r}")
    for c in chunks:
        expect("error" not in c, f"the stream carries an error: {c}")
        expect(c.get("object") == obj, f"object {c.get('object')!r} != {obj!r}")
        expect(type(c.get("created")) is int, f"created {c.get('created')!r} is not an int")
        expect(c.get("model") == model, f"model {c.get('model')!r} != {model!r}")
    ids = {c.get("id") for c in chunks}
    expect(len(ids) == 1 and isinstance(next(iter(ids)), str), f"the chunks do not share one id: {ids}")
    body = chunks[:-1] if include_usage else chunks
    if include_usage:
        last = chunks[-1]
        expect(last.get("choices") == [] and isinstance(last.get("usage"), dict),
               f"the last chunk is not the usage chunk (choices [] and usage): {last}")
    else:
        expect(all("usage" not in c or c["usage"] is None for c in chunks), "a usage chunk came without include_usage")
    for c in body:
        expect(isinstance(c.get("choices"), list) and len(c["choices"]) == 1, f"a chunk without exactly one choice: {c}")
        expect(c["choices"][0].get("index") == 0, f"choice index is not 0: {c}")
    finishes = [c["choices"][0].get("finish_reason") for c in body]
    expect(sum(f is not None for f in finishes) == 1 and finishes[-1] in ("stop", "length"),
           f"finish_reason should be set on the last choice chunk only, got {finishes}")
    return chunks


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: python openai_client.py <base_url> <api_key>")
    base, key = sys.argv[1].rstrip("/"), sys.argv[2]
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, timeout=TIMEOUT, max_retries=0)
    print(f"# openai {openai.__version__} against {base}", flush=True)

    status, _, body = http(base, "GET", "/health")
    if status != 200:
        sys.exit(f"not ok - GET /health answered {status}: {body[:300]!r} (is the server up and loaded?)")
    model = json.loads(body).get("model")
    if not isinstance(model, str) or not model:
        sys.exit(f"not ok - GET /health does not name the model: {body[:300]!r}")
    print(f"# served model {model!r}", flush=True)
    S = {}  # results shared between checks

    @check("models.list() holds the served model and models.retrieve() returns it")
    def _():
        ids = [m.id for m in client.models.list()]
        expect(model in ids, f"models.list() gives {ids}, without {model!r}")
        m = client.models.retrieve(model)
        expect(m.id == model and m.object == "model", f"retrieve gave id={m.id!r} object={m.object!r}")
        expect(isinstance(m.created, int) and m.owned_by == "glm-rs", f"created={m.created!r} owned_by={m.owned_by!r}")
        return f"ids {ids}"

    @check("completions.create (greedy, max_tokens=5): one choice, finish_reason and usage consistent")
    def _():
        r = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
        expect(r.object == "text_completion", f"object {r.object!r}")
        expect(r.id.startswith("cmpl-"), f"id {r.id!r} does not start with cmpl-")
        expect(r.model == model and isinstance(r.created, int), f"model {r.model!r} created {r.created!r}")
        expect(len(r.choices) == 1, f"{len(r.choices)} choices")
        c = r.choices[0]
        expect(c.index == 0 and isinstance(c.text, str), f"choice {c}")
        expect(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
        u = r.usage
        expect(u is not None, "no usage")
        expect(u.prompt_tokens > 0, f"prompt_tokens {u.prompt_tokens}")
        expect(0 <= u.completion_tokens <= 5, f"completion_tokens {u.completion_tokens} not in [0, 5]")
        if c.finish_reason == "length":
            expect(u.completion_tokens == 5, f"finish_reason length but completion_tokens {u.completion_tokens} != max_tokens 5")
        expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"total_tokens {u.total_tokens} != {u.prompt_tokens} + {u.completion_tokens}")
        # the prompt as an array of one string is the same request
        r2 = client.completions.create(model=model, prompt=["Hello"], max_tokens=5, temperature=0)
        expect(r2.choices[0].text == c.text, f"prompt ['Hello'] gave {short(r2.choices[0].text)}, 'Hello' gave {short(c.text)}")
        S["completion"] = r
        return f"text {short(c.text)}, finish_reason {c.finish_reason}, usage {u.prompt_tokens}+{u.completion_tokens}"

    @check("streamed completions (include_usage): same text, one finish_reason, final usage chunk")
    def _():
        expect("completion" in S, "needs the non-streamed completion check")
        ref = S["completion"]
        chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        expect(len(chunks) >= 2, f"only {len(chunks)} chunks")
        with_choices = [c for c in chunks if c.choices]
        text = "".join(c.choices[0].text for c in with_choices)
        expect(text == ref.choices[0].text, f"streamed {short(text)} != non-streamed {short(ref.choices[0].text)}")
        finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason is not None]
        expect(finishes == [ref.choices[0].finish_reason], f"finish_reasons in the stream {finishes}, non-streamed {ref.choices[0].finish_reason!r}")
        last = chunks[-1]
        expect(last.choices == [] and last.usage is not None, f"the last chunk is not choices [] + usage: {last}")
        expect(sum(1 for c in chunks if not c.choices) == 1, "more than one chunk without choices")
        expect(last.usage.completion_tokens == ref.usage.completion_tokens and last.usage.prompt_tokens == ref.usage.prompt_tokens
               and last.usage.total_tokens == ref.usage.total_tokens, f"stream usage {last.usage} != non-stream usage {ref.usage}")
        expect(len({c.id for c in chunks}) == 1, "the chunks do not share one id")
        expect(all(c.object == "text_completion" and c.model == model for c in chunks), "a chunk with a wrong object or model")
        return f"{len(chunks)} chunks"

    @check("chat.completions.create (greedy, max_tokens=5): assistant message, usage consistent")
    def _():
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0)
        expect(r.object == "chat.completion", f"object {r.object!r}")
        expect(r.model == model and isinstance(r.created, int), f"model {r.model!r} created {r.created!r}")
        expect(len(r.choices) == 1, f"{len(r.choices)} choices")
        c = r.choices[0]
        expect(c.message.role == "assistant", f"role {c.message.role!r}")
        expect(isinstance(c.message.content, str), f"content {c.message.content!r} is not a string")
        expect(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
        u = r.usage
        expect(u is not None and 0 <= u.completion_tokens <= 5 and u.prompt_tokens > 0, f"usage {u}")
        if c.finish_reason == "length":
            expect(u.completion_tokens == 5, f"finish_reason length but completion_tokens {u.completion_tokens}")
        expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage {u} does not add up")
        S["chat"] = r
        return f"content {short(c.message.content)}, finish_reason {c.finish_reason}"

    @check("streamed chat: first delta has role assistant, content deltas concatenate to the message")
    def _():
        expect("chat" in S, "needs the non-streamed chat check")
        ref = S["chat"]
        chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                                     temperature=0, stream=True, stream_options={"include_usage": True}))
        with_choices = [c for c in chunks if c.choices]
        expect(with_choices and with_choices[0].choices[0].delta.role == "assistant",
               f"the first delta is {with_choices[0].choices[0].delta if with_choices else None}")
        text = "".join(c.choices[0].delta.content or "" for c in with_choices)
        expect(text == ref.choices[0].message.content, f"streamed {short(text)} != non-streamed {short(ref.choices[0].message.content)}")
        finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason is not None]
        expect(finishes == [ref.choices[0].finish_reason], f"finish_reasons in the stream {finishes}")
        expect(all(c.object == "chat.completion.chunk" for c in chunks), "a chunk whose object is not chat.completion.chunk")
        last = chunks[-1]
        expect(last.choices == [] and last.usage is not None and last.usage.completion_tokens == ref.usage.completion_tokens,
               f"the last chunk is not the usage chunk matching the non-streamed usage: {last}")
        return f"{len(chunks)} chunks"

    @check("seed makes sampling reproducible (temperature=1, seed=7, twice)")
    def _():
        texts = [client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=1, seed=7).choices[0].text
                 for _ in range(2)]
        expect(texts[0] == texts[1], f"seed 7 gave {short(texts[0])} and then {short(texts[1])}")
        chat = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                               temperature=1, seed=7).choices[0].message.content for _ in range(2)]
        expect(chat[0] == chat[1], f"chat with seed 7 gave {short(chat[0])} and then {short(chat[1])}")
        return f"text {short(texts[0])}"

    @check("n=3 gives three choices, choice i as the request with seed 7+i; a list of 2 prompts with n=2 gives 4")
    def _():
        r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=1, seed=7, n=3)
        expect([c.index for c in r.choices] == [0, 1, 2], f"choice indices {[c.index for c in r.choices]}")
        for c in r.choices:
            one = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=1,
                                            seed=7 + c.index).choices[0].text
            expect(c.text == one, f"choice {c.index}: {short(c.text)} vs seed {7 + c.index} alone: {short(one)}")
        prompts = ["Once upon a time", "Hello"]
        b = client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=1, seed=3, n=2)
        expect([c.index for c in b.choices] == [0, 1, 2, 3], f"batch choice indices {[c.index for c in b.choices]}")
        for c in b.choices:
            one = client.completions.create(model=model, prompt=prompts[c.index // 2], max_tokens=4, temperature=1,
                                            seed=3 + c.index % 2).choices[0].text
            expect(c.text == one, f"batch choice {c.index}: {short(c.text)} vs its prompt alone: {short(one)}")
        return f"{len(r.choices)} choices, usage {r.usage.completion_tokens} tokens; batch of 2 prompts: {len(b.choices)} choices"

    @check("logprobs parse into the client's types (completions logprobs=2, chat logprobs + top_logprobs=2, streamed chat)")
    def _():
        r = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                                      extra_body={"min_tokens": 5})
        c = r.choices[0]
        lp = c.logprobs
        expect(lp is not None, "choice.logprobs is None")
        n = r.usage.completion_tokens
        expect(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n,
               f"{len(lp.tokens)} tokens, {len(lp.token_logprobs)} logprobs, {len(lp.top_logprobs)} tops, "
               f"{len(lp.text_offset)} offsets for {n} completion tokens")
        expect(all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs), f"token_logprobs {lp.token_logprobs}")
        expect(all(isinstance(t, dict) and 1 <= len(t) <= 2 for t in lp.top_logprobs), f"top_logprobs {lp.top_logprobs}")
        expect(lp.text_offset == sorted(lp.text_offset), f"text_offset not increasing: {lp.text_offset}")
        if not any(t.startswith("bytes:") for t in lp.tokens):
            expect("".join(lp.tokens) == c.text, f"tokens {lp.tokens} do not spell {short(c.text)}")
        ch = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, logprobs=True, top_logprobs=2, extra_body={"min_tokens": 4})
        content = ch.choices[0].logprobs.content
        expect(len(content) == ch.usage.completion_tokens, f"{len(content)} entries, {ch.usage.completion_tokens} tokens")
        for e in content:
            expect(isinstance(e.token, str) and e.logprob <= 0 and isinstance(e.bytes, list), f"entry {e}")
            expect(len(e.top_logprobs) == 2 and all(isinstance(t.token, str) for t in e.top_logprobs), f"top {e.top_logprobs}")
        streamed = []
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                                    temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                                    extra_body={"min_tokens": 4}):
            if chunk.choices and chunk.choices[0].logprobs is not None and chunk.choices[0].logprobs.content:
                streamed.extend(chunk.choices[0].logprobs.content)
        expect([(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content],
               f"streamed {[(e.token, e.logprob) for e in streamed]} vs whole {[(e.token, e.logprob) for e in content]}")
        return f"completion tokens {lp.tokens}, chat tokens {[e.token for e in content]}"

    @check("errors raise the client's exception classes (404 model, 400 max_tokens=-1, 401 key)")
    def _():
        try:
            client.completions.create(model="no-such-model", prompt="Hello", max_tokens=1)
            raise CheckError("a wrong model name was accepted")
        except openai.NotFoundError as e:
            expect(e.status_code == 404, f"status {e.status_code}")
            expect(e.code == "model_not_found", f"error code {e.code!r}, not 'model_not_found'")
        try:
            client.completions.create(model=model, prompt="Hello", max_tokens=-1)
            raise CheckError("max_tokens=-1 was accepted")
        except openai.BadRequestError as e:
            expect(e.status_code == 400 and e.message, f"status {e.status_code}, message {e.message!r}")
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong-" + key, timeout=TIMEOUT, max_retries=0)
        try:
            bad.models.list()
            raise CheckError("a wrong API key was accepted (was the server started with this key?)")
        except openai.AuthenticationError as e:
            expect(e.status_code == 401, f"status {e.status_code}")
        try:
            bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
            raise CheckError("a wrong API key was accepted by chat completions")
        except openai.AuthenticationError:
            pass

    @check("error bodies: {error: {message, type, param, code}} (401 no key, 404 model, 404 route); /health needs no key")
    def _():
        cases = [
            ("GET", "/v1/models", None, None, 401, "authentication_error", None),
            ("POST", "/v1/completions", key, {"model": "no-such-model", "prompt": "Hello"}, 404, "invalid_request_error", "model_not_found"),
            ("GET", "/v1/models/no-such-model", key, None, 404, None, None),
            ("GET", "/v1/no-such-route", key, None, 404, None, None),
            ("POST", "/v1/completions", key, {"model": model, "prompt": "Hello", "max_tokens": -1}, 400, "invalid_request_error", None),
        ]
        for method, path, k, body, want, typ, code in cases:
            status, headers, raw = http(base, method, path, k, body)
            what = f"{method} {path}" + (" without a key" if k is None else "")
            expect(status == want, f"{what} answered {status}, not {want}: {raw[:200]!r}")
            expect((headers.get("Content-Type") or "").startswith("application/json"), f"{what}: Content-Type {headers.get('Content-Type')!r}")
            try:
                err = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                raise CheckError(f"{what}: body is not {{\"error\": {{...}}}}: {raw[:200]!r}")
            expect(isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"] and isinstance(err.get("type"), str)
                   and "param" in err and "code" in err, f"{what}: error object {err}")
            if typ:
                expect(err["type"] == typ, f"{what}: type {err['type']!r}, not {typ!r}")
            if code:
                expect(err["code"] == code, f"{what}: code {err['code']!r}, not {code!r}")
        status, _, raw = http(base, "GET", "/health")
        expect(status == 200, f"/health without a key answered {status}")

    @check("raw SSE framing of /v1/completions: only `data: <json>\\n\\n` events, then `data: [DONE]\\n\\n`")
    def _():
        req = {"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        status, _, raw = http(base, "POST", "/v1/completions", key, req)
        expect(status == 200, f"non-streamed request answered {status}")
        ref = json.loads(raw)
        notes = []
        for include_usage in (False, True):
            body = dict(req, stream=True, **({"stream_options": {"include_usage": True}} if include_usage else {}))
            status, headers, raw = http(base, "POST", "/v1/completions", key, body)
            expect(status == 200, f"streamed request answered {status}: {raw[:200]!r}")
            ctype = headers.get("Content-Type") or ""
            expect(ctype.startswith("text/event-stream"), f"Content-Type {ctype!r}")
            chunks = check_stream_frames(raw, model, "text_completion", include_usage)
            body_chunks = chunks[:-1] if include_usage else chunks
            expect(all(isinstance(c["choices"][0].get("text"), str) and c["choices"][0].get("logprobs") is None for c in body_chunks),
                   "a chunk without a text string or with logprobs")
            expect(body_chunks[-1]["choices"][0]["text"] == "", f"the finish chunk carries text {body_chunks[-1]['choices'][0]['text']!r}")
            text = "".join(c["choices"][0]["text"] for c in body_chunks)
            expect(text == ref["choices"][0]["text"], f"streamed {short(text)} != non-streamed {short(ref['choices'][0]['text'])}")
            expect(body_chunks[-1]["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"], "finish_reason differs from the non-streamed one")
            if include_usage:
                expect(chunks[-1]["usage"] == ref["usage"], f"stream usage {chunks[-1]['usage']} != {ref['usage']}")
            notes.append(f"{len(chunks) + 1} events")
        # chat: the same framing with chat.completion.chunk objects
        status, headers, raw = http(base, "POST", "/v1/chat/completions", key,
                                    {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                     "temperature": 0, "stream": True})
        expect(status == 200 and (headers.get("Content-Type") or "").startswith("text/event-stream"), f"chat stream answered {status}")
        chunks = check_stream_frames(raw, model, "chat.completion.chunk", False)
        expect(chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}, f"first chat delta {chunks[0]['choices'][0]['delta']}")
        expect(chunks[-1]["choices"][0]["delta"] == {}, f"the chat finish chunk's delta is {chunks[-1]['choices'][0]['delta']}, not {{}}")
        notes.append(f"chat {len(chunks) + 1} events")
        return ", ".join(notes)

    print(f"openai_client: {RESULTS['passed']} passed, {RESULTS['failed']} failed", flush=True)
    return 0 if RESULTS["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
