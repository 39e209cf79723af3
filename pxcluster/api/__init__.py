"""The node's HTTP surface on --api-port: REST API, /metrics, /healthz, /readyz."""
