"""One call's pure state machine and the small machines it is made of."""

from agentd.call.call import Call, Msg, Phase
from agentd.call.settings import DEFAULT_FALLBACK, DEFAULT_GREETING, CallSettings

__all__ = ["DEFAULT_FALLBACK", "DEFAULT_GREETING", "Call", "CallSettings", "Msg", "Phase"]
