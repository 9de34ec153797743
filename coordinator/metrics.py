"""The coordinator's Prometheus metrics: requests, routing decisions, per-node latency.

`CoordinatorMetrics` owns the families on the registry it is given (one per
app: tests pass a fresh one, `macmesh up` keeps it apart from its node's).
The mesh view is read at scrape time (`macmesh_node_up`), never copied.

Labels stay bounded: `model` is a resolved model id (served, or named by the
config), `alias` a configured alias or a served model id, `tier` a Claude tier;
anything else is "other" (or "none" for no tier). `key` is the name of an API key
(the names the key file gives, "default" for --api-key keys), "none" without keys:
only authenticated keys reach the counter, never a raw key. It has a family of its
own (`macmesh_key_requests_total{key, api, status}`) rather than a label on
`macmesh_requests_total`, so keys do not multiply the model/alias/tier series.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.api.common import http_status
from coordinator.groups import GroupManager
from coordinator.nodes import NodeRegistry
from mesh import errors
from mesh.metrics import E2E_BUCKETS, OTHER, PREFIX, TTFT_BUCKETS, bounded
from routing.aliases import TIERS, Resolution, RoutingConfig, resolve
from routing.policy import REASONS

APIS = ("anthropic", "openai")
NO_TIER = "none"
# `key` of requests to a coordinator without API keys.
NO_KEY = "none"
# `status` of a request whose caller went away before it finished (nginx's code).
CLIENT_CLOSED = "499"
OK = "200"
SERVER_ERROR = "500"


def status_of(err: errors.MeshError) -> str:
    """The `status` label of a failed request: the HTTP status its error maps to."""
    return str(http_status(err))


def event_status(code: str) -> str:
    """The `status` of a node's mid-stream error event (a gRPC status name).

    The APIs report a node-side cancel (the node shut down) as a server error.
    """
    if code == errors.Cancelled.code:
        return SERVER_ERROR
    return status_of(errors.from_code(code, ""))


def alias_label(res: Resolution | None) -> str:
    """The configured alias (or wildcard pattern) or served model id the name matched."""
    if res is None:
        return OTHER
    if res.rule in ("alias", "exact"):
        return res.requested
    if res.rule.startswith("wildcard:"):
        return res.rule.removeprefix("wildcard:")
    return OTHER  # a Claude tier, the Claude default or the default model


def tier_label(res: Resolution | None) -> str:
    return res.tier if res is not None and res.tier in TIERS else NO_TIER


class CoordinatorMetrics:
    """Counters and histograms of one coordinator, plus scrape-time node status."""

    def __init__(self, registry: CollectorRegistry, nodes: NodeRegistry | None = None) -> None:
        self.registry = registry
        p = PREFIX
        self.requests = Counter(
            f"{p}requests",
            "Generation requests by API, resolved model, requested alias / Claude tier and "
            "outcome (the HTTP status; for a failure after a stream began, the status its "
            "error maps to; 499 = the client went away).",
            ["api", "model", "alias", "tier", "status"],
            registry=registry,
        )
        self.key_requests = Counter(
            f"{p}key_requests",
            "Generation requests by API key name (none: the coordinator has no keys), API "
            "and status (as in macmesh_requests_total; 429 = over the key's max_concurrent, "
            "403 = a model the key may not use).",
            ["key", "api", "status"],
            registry=registry,
        )
        self.route_decisions = Counter(
            f"{p}route_decisions",
            "Routing decisions by reason (the x-macmesh-route-reason header).",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            self.route_decisions.labels(reason)
        self.ttft = Histogram(
            f"{p}time_to_first_token_seconds",
            "Seconds from the request's arrival at the coordinator to the first output token "
            "from the node (render, routing, queue and prefill included).",
            ["node", "model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            f"{p}e2e_request_latency_seconds",
            "Seconds from the request's arrival at the coordinator to the node's finish.",
            ["node", "model"],
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        if nodes is not None:
            registry.register(NodeUpCollector(nodes))
            registry.register(GroupUpCollector(nodes))

    def route(self, reason: str) -> None:
        """A routing decision was made (`reason`: a routing.policy.Reason value)."""
        self.route_decisions.labels(bounded(reason, REASONS)).inc()

    def request(
        self, api: str, res: Resolution | None, status: str, key: str | None = None
    ) -> None:
        """One generation request ended with `status`; `key`: its API key's name."""
        model = res.model if res is not None else OTHER
        labels = (bounded(api, APIS), model, alias_label(res), tier_label(res), status)
        self.requests.labels(*labels).inc()
        self.key_requests.labels(key or NO_KEY, bounded(api, APIS), status).inc()

    def preinit_keys(self, names: Iterable[str]) -> None:
        """Create each key's success series at 0 (see `preinit`)."""
        for name in names:
            for api in APIS:
                self.key_requests.labels(name, api, OK)

    def preinit(self, routing: RoutingConfig, loaded: Collection[str]) -> None:
        """Create the success series of every configured alias and tier and loaded model.

        A counter series born at 1 hides its first request from rate() and
        increase(); born at 0 (here, at scrape time, so config edits and newly
        loaded models are followed) it does not.
        """
        names = [*routing.aliases, *(f"claude-{tier}" for tier in routing.claude.tiers), *loaded]
        for name in names:
            # A wildcard key usually matches itself: the labels its requests get.
            res = resolve(name, routing, loaded)
            if res is None:
                continue
            labels = (res.model, alias_label(res), tier_label(res), OK)
            for api in APIS:
                self.requests.labels(api, *labels)

    def latency(self, node: str, model: str) -> tuple[Histogram, Histogram]:
        """TTFT and e2e children for a request on `node` (bound once per attempt)."""
        return self.ttft.labels(node, model), self.e2e.labels(node, model)


class NodeUpCollector(Collector):
    """`macmesh_node_up{node}`: 1 for each node this coordinator can route to now."""

    def __init__(self, nodes: NodeRegistry) -> None:
        self.nodes = nodes

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        up: dict[str, int] = {}
        stale_after = self.nodes.stale_after
        for view in self.nodes.nodes():
            # A node found at two addresses (restarted elsewhere) is one node.
            up[view.node_id] = max(up.get(view.node_id, 0), int(view.online(stale_after)))
        gauge = GaugeMetricFamily(
            f"{PREFIX}node_up",
            "1 when this coordinator can route to the node (state fresh, not draining).",
            labels=["node"],
        )
        for node, value in sorted(up.items()):
            gauge.add_metric([node], value)
        yield gauge


class GroupUpCollector(Collector):
    """`macmesh_group_up{group,model}`: 1 for each node group that serves now, 0 for a
    down (or forming) one; `macmesh_group_members{group}`: its size."""

    def __init__(self, nodes: NodeRegistry) -> None:
        self.groups = GroupManager(nodes)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}group_up",
            "1 when the node group serves its model (every rank up on an online node).",
            labels=["group", "model"],
        )
        size = GaugeMetricFamily(
            f"{PREFIX}group_members", "Nodes in the node group.", labels=["group"]
        )
        for g in self.groups.groups():
            up.add_metric([g.name, g.model], int(g.state == "up"))
            size.add_metric([g.name], g.size)
        yield up
        yield size
