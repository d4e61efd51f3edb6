"""Sessions (the original design's server-kept chat history): a chat request with `session_id`
is generated on the session's earlier messages followed by its own, under the context-overflow
policy like any long conversation; its messages and the reply are then saved. A session is
forgotten `session_ttl_s` after its last turn, and belongs to the key that made it.

Turns of one session take turns: within an instance a lock per (owner, id) is held from reading
the history to saving the reply (a stream's: until the stream ends); across instances sharing a
store, a save writes only over the record it read, and otherwise appends its turn after the one
saved meanwhile. No turn is dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from pydantic import TypeAdapter, ValidationError

from ...errors import ConflictError, InternalError, InvalidRequestError, NotFoundError
from ...state.store import Json, RecordKey, StateStore
from .types import ChatCompletionRequest, ChatMessage

SESSION = "session"
MESSAGES: TypeAdapter[list[ChatMessage]] = TypeAdapter(list[ChatMessage])
DONE = "[DONE]"
SAVE_ATTEMPTS = 8  # each one lost only to another instance's save of the same session


class SessionLocks:
    """One asyncio lock per (owner, session id) while a turn holds or awaits it; none when idle."""

    def __init__(self) -> None:
        self._locks: dict[RecordKey, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, key: RecordKey) -> None:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave(key)
            raise

    def release(self, key: RecordKey) -> None:
        self._locks[key][0].release()
        self._leave(key)

    def _leave(self, key: RecordKey) -> None:
        lock, users = self._locks[key]
        if users == 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)


class Session:
    def __init__(
        self,
        store: StateStore,
        key: RecordKey,
        ttl_s: float,
        stored: Json | None,
        max_messages: int,
    ) -> None:
        self.store = store
        self.key = key
        self.ttl_s = ttl_s
        self.stored = stored  # as read: a save writes only over this
        self.record = stored or _new_record(key.id, int(time.time()))
        self.locks: SessionLocks | None = None
        # A request's messages are at most --max-messages, its session's included: a long
        # session goes on from its newest turns instead of being refused from then on.
        self.max_messages = max_messages
        self.earlier: list[Json] = []  # the history this request continues

    @classmethod
    async def open(
        cls,
        store: StateStore,
        owner: str,
        body: ChatCompletionRequest,
        ttl_s: float,
        max_messages: int,
        *,
        locks: SessionLocks,
    ) -> Session | None:
        """The request's session (a new one for an id not seen before), or None without one;
        it holds the session's lock until `release`."""
        if body.session_id is None:
            return None
        if body.n != 1:
            raise InvalidRequestError("a session continues one answer: n must be 1", param="n")
        key = RecordKey(owner, SESSION, body.session_id)
        await locks.acquire(key)
        try:
            session = cls(store, key, ttl_s, await store.get(key), max_messages)
        except BaseException:
            locks.release(key)
            raise
        session.locks = locks
        return session

    def release(self) -> None:
        """Lets the session's next turn in; once only, however often it is called."""
        if self.locks is not None:
            self.locks.release(self.key)
            self.locks = None

    @property
    def history(self) -> list[Json]:
        messages: list[Json] = self.record["messages"]
        return messages

    def continued(self, body: ChatCompletionRequest) -> ChatCompletionRequest:
        """The request with the session's newest messages before its own."""
        self.earlier = newest_messages(self.history, self.max_messages - len(body.messages))
        try:
            earlier = MESSAGES.validate_python(self.earlier)
        except ValidationError:
            raise InternalError("A stored session message could not be read back.") from None
        return body.model_copy(update={"messages": [*earlier, *body.messages]})

    async def save(self, body: ChatCompletionRequest, reply: Json) -> None:
        """`body` as `continued` made it: its own messages follow the session's."""
        turn = [*(_dumped(message) for message in body.messages[len(self.earlier) :]), reply]
        before, expected = self.earlier, self.stored
        for _ in range(SAVE_ATTEMPTS):
            messages = newest_messages([*before, *turn], self.max_messages)
            record = {**(expected or self.record), "messages": messages}
            record["updated_at"] = int(time.time())
            if await self.store.replace(self.key, record, expected, ttl_s=self.ttl_s):
                self.stored = record
                return
            # another instance saved a turn of this session meanwhile: this one goes after it
            expected = await self.store.get(self.key)
            before = expected["messages"] if expected is not None else []
        raise ConflictError(
            "This session is being changed by other requests; send the turn again.",
            code="session_busy",
        )

    async def saved_after(
        self, events: AsyncIterator[dict[str, str]], body: ChatCompletionRequest
    ) -> AsyncIterator[dict[str, str]]:
        """A chat stream's events; the reply is saved before the final `[DONE]`, unless the
        stream ended with an error."""
        reply = StreamedReply()
        async for event in events:
            data = event.get("data", "")
            if data == DONE and reply.finished:
                await self.save(body, reply.message())
            elif data != DONE:
                reply.feed(json.loads(data))
            yield event


def newest_messages(messages: list[Json], at_most: int) -> list[Json]:
    """At most `at_most` messages: the leading system messages, then the newest turns from a
    user message on (a cut never leaves a reply without what it answers)."""
    if len(messages) <= at_most:
        return messages
    pinned = 0
    while pinned < len(messages) and messages[pinned].get("role") in ("system", "developer"):
        pinned += 1
    room = at_most - pinned
    if room <= 0:
        return []
    newest = messages[len(messages) - room :]
    first_user = next(
        (index for index, message in enumerate(newest) if message.get("role") == "user"),
        len(newest),
    )
    return [*messages[:pinned], *newest[first_user:]]


def reply_of(completion: Json) -> Json:
    """The assistant message of a whole chat completion, as the session keeps it."""
    message = completion["choices"][0]["message"]
    kept = ("role", "content", "tool_calls", "reasoning_content")
    return {name: message[name] for name in kept if message.get(name) is not None}


class StreamedReply:
    """The assistant message put back together from a chat stream's deltas."""

    def __init__(self) -> None:
        self.content = ""
        self.reasoning = ""
        self.tool_calls: dict[int, Json] = {}
        self.finished = False

    def feed(self, chunk: Json) -> None:
        if "error" in chunk:
            self.finished = False
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            self.content += delta.get("content") or ""
            self.reasoning += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or ():
                self._call(call)
            self.finished = self.finished or choice.get("finish_reason") is not None

    def _call(self, call: Json) -> None:
        kept = self.tool_calls.setdefault(
            call["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        kept["id"] = call.get("id") or kept["id"]
        function = call.get("function") or {}
        kept["function"]["name"] += function.get("name") or ""
        kept["function"]["arguments"] += function.get("arguments") or ""

    def message(self) -> Json:
        message: Json = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[index] for index in sorted(self.tool_calls)]
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        return message


async def read_session(store: StateStore, owner: str, session_id: str) -> Json:
    record = await store.get(RecordKey(owner, SESSION, session_id))
    if record is None:
        raise NotFoundError(f"Session with id '{session_id}' not found.")
    return record


async def delete_session(store: StateStore, owner: str, session_id: str) -> Json:
    if not await store.delete(RecordKey(owner, SESSION, session_id)):
        raise NotFoundError(f"Session with id '{session_id}' not found.")
    return {"id": session_id, "object": "session.deleted", "deleted": True}


def _new_record(session_id: str, now: int) -> Json:
    return {"id": session_id, "object": "session", "created_at": now, "messages": []}


def _dumped(message: ChatMessage) -> Json:
    dumped: Json = message.model_dump(exclude_none=True)
    return dumped
