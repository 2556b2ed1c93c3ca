"""Wire protocol layer: vhost-user messages as typed objects, no I/O."""

from .codec import (
    BACKEND_LAYOUTS,
    FRONTEND_LAYOUTS,
    NEED_DATA,
    Layout,
    Message,
    MessageReader,
    ack,
    close_all,
    encode_message,
    reply,
    request,
    request_name,
)
from .extension import AsidIotlbMsg, VendorProtocolFeature, VendorRequest
from .constants import (
    DEVICE_STATE_REPLY_ERROR_MASK,
    DEVICE_STATE_REPLY_NO_FD,
    BackendRequest,
    DeviceStateDirection,
    DeviceStatePhase,
    FrontendRequest,
    HeaderFlag,
    IotlbPerm,
    IotlbType,
    ProtocolFeature,
    VirtioFeature,
)
from .errors import (
    BadFlags,
    BadPayloadSize,
    FramingError,
    InvalidField,
    MalformedMessage,
    MissingFds,
    PeerClosed,
    UnexpectedFds,
    UnknownRequest,
    WireError,
)
from .messages import (
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    InflightDescription,
    IotlbMsg,
    LogDescription,
    MemRegion,
    MemTable,
    SingleMemRegion,
    U64,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)

__all__ = [name for name in dir() if not name.startswith("_")]
