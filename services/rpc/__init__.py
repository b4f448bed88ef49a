"""gRPC plumbing shared by the three services: status mapping, operations, server assembly."""
