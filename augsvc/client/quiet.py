"""Keep gRPC core's own log lines off the trainer's stderr: GRPC_VERBOSITY=ERROR unless set.

gRPC core logs through absl, and before anything initialises absl logging every INFO line
reaches stderr (e.g. "chttp2_transport.cc:1403] ...: Got goaway [2] ..." each time a
server stops with calls in flight). grpcio reads GRPC_VERBOSITY once, when `grpc` is first
imported: this module runs before the client imports grpc and sets the variable only if
the user has not. If the process imported grpc before augsvc, it is too late: set
GRPC_VERBOSITY=ERROR in the environment instead. GRPC_VERBOSITY=INFO or DEBUG (and
GRPC_TRACE) bring gRPC's lines back.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
