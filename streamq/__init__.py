"""streamq: reliable, asyncio-native message processing over Redis Streams consumer groups.

At-least-once: every published message is handled successfully (then acked) or
kept in a dead-letter stream, whatever happens to consumers, Redis or the network.
"""

from ._backoff import Backoff as Backoff
from ._codec import JsonCodec as JsonCodec
from ._consumer import AsyncConsumer as AsyncConsumer
from ._consumer import ConsumerState as ConsumerState
from ._consumer import ConsumerStats as ConsumerStats
from ._consumer import Handler as Handler
from ._consumer import HandlerFunc as HandlerFunc
from ._errors import ClosedError as ClosedError
from ._errors import DeadLetteredError as DeadLetteredError
from ._errors import GroupRecreatedError as GroupRecreatedError
from ._errors import HandlerError as HandlerError
from ._errors import HandlerPanic as HandlerPanic
from ._errors import LeaseLostError as LeaseLostError
from ._errors import MalformedMessageError as MalformedMessageError
from ._errors import MessageLostError as MessageLostError
from ._errors import NetworkError as NetworkError
from ._errors import RedisError as RedisError
from ._errors import StreamqError as StreamqError
from ._errors import UnsupportedServerError as UnsupportedServerError
from ._errorstream import ErrorStream as ErrorStream
from ._errorstream import ErrorStreamStatistics as ErrorStreamStatistics
from ._message import FieldValue as FieldValue
from ._message import Message as Message
from ._middleware import CallNext as CallNext
from ._middleware import HandlerMiddleware as HandlerMiddleware
from ._middleware import PublishMiddleware as PublishMiddleware
from ._options import ConsumerOptions as ConsumerOptions
from ._options import PublisherOptions as PublisherOptions
from ._options import RedisLike as RedisLike
from ._partition import PartitionedStream as PartitionedStream
from ._publisher import AsyncPublisher as AsyncPublisher
from ._publisher import PublisherStats as PublisherStats
from ._result import Result as Result
from ._result import discard as discard
from ._result import fail as fail
from ._result import success as success
from ._version import __version__ as __version__

__all__ = [
    "AsyncConsumer",
    "AsyncPublisher",
    "Backoff",
    "CallNext",
    "ClosedError",
    "ConsumerOptions",
    "ConsumerState",
    "ConsumerStats",
    "DeadLetteredError",
    "ErrorStream",
    "ErrorStreamStatistics",
    "FieldValue",
    "GroupRecreatedError",
    "Handler",
    "HandlerError",
    "HandlerFunc",
    "HandlerMiddleware",
    "HandlerPanic",
    "JsonCodec",
    "LeaseLostError",
    "MalformedMessageError",
    "Message",
    "MessageLostError",
    "NetworkError",
    "PartitionedStream",
    "PublishMiddleware",
    "PublisherOptions",
    "PublisherStats",
    "RedisError",
    "RedisLike",
    "Result",
    "StreamqError",
    "UnsupportedServerError",
    "__version__",
    "discard",
    "fail",
    "success",
]

import logging as _logging

# A library must never print: without this, Python's last-resort handler would
# write streamq's warnings to stderr in applications that configure no logging.
_logging.getLogger("streamq").addHandler(_logging.NullHandler())
