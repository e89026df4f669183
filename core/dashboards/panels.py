"""Small builders over grafana-foundation-sdk for kvpilot's dashboards: one Prometheus data source
chosen by a variable, variables for namespace/service/role, time series and stat panels.

Label selectors. Engines and routers carry their PodMonitor's target labels (`namespace`,
`kvpilot_io_service`, `kvpilot_io_role`); the autoscaler and the operator name the LLMService in
their own `namespace`/`service` labels, and the autoscaler's `pool` is the pool's role. Every
variable's "All" is the regex `.*`, which also matches a missing label: the engine panels then work
for plain vLLM pods that no kvpilot PodMonitor labelled.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

DS = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
ENGINE = 'namespace=~"$namespace", kvpilot_io_service=~"$service", kvpilot_io_role=~"$role"'
ROUTER = 'namespace=~"$namespace", kvpilot_io_service=~"$service"'
SCALER = 'namespace=~"$namespace", service=~"$service", pool=~"$role"'
SERVICE = 'namespace=~"$namespace", service=~"$service"'
RATE = "$__rate_interval"


def variables(with_role: bool = True) -> list[dashboard.DatasourceVariable | dashboard.QueryVariable]:
    """datasource, namespace, service (and role), each narrowing the next."""
    out: list[dashboard.DatasourceVariable | dashboard.QueryVariable] = [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")]
    chain = [("namespace", "Namespace", "label_values(vllm:num_requests_running, namespace)"),
             ("service", "LLMService",
              'label_values(vllm:num_requests_running{namespace=~"$namespace"}, kvpilot_io_service)')]
    if with_role:
        chain.append(("role", "Pool role", 'label_values(vllm:num_requests_running{namespace=~"$namespace", '
                                           'kvpilot_io_service=~"$service"}, kvpilot_io_role)'))
    for name, label, query in chain:
        out.append(dashboard.QueryVariable(name).label(label).datasource(DS).query(query)
                   .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)
                   .multi(True).include_all(True).all_value(".*")
                   .current(model.VariableOption(selected=True, text="All", value="$__all")))
    return out


def target(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref).datasource(DS).range()


def _targets(queries: list[tuple[str, str]]) -> list[Builder[Dataquery]]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def series(title: str, description: str, queries: list[tuple[str, str]], unit: str = "short", *,
           w: int = 12, h: int = 8, min_val: float | None = 0, max_val: float | None = None,
           dashed: tuple[str, ...] = ()) -> timeseries.Panel:
    """A time series panel; series whose legend is in `dashed` (SLO lines, targets) draw dashed."""
    p = (timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
         .targets(_targets(queries)).line_width(1).fill_opacity(8)
         .legend(common_b.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                 .placement(common.LegendPlacement.BOTTOM).calcs([])))
    if min_val is not None:
        p = p.min(min_val)
    if max_val is not None:
        p = p.max(max_val)
    for legend in dashed:
        p = p.override_by_name(legend, [
            model.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
            model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"})])
    return p


def single(title: str, description: str, expr: str, unit: str = "short", *, w: int = 6, h: int = 5,
           red_below: float | None = None, red_above: float | None = None, legend: str = "") -> stat.Panel:
    """A stat panel with its sparkline; red past a threshold when one is given."""
    steps = [model.Threshold(value=None, color="green")]
    if red_above is not None:
        steps.append(model.Threshold(value=red_above, color="red"))
    if red_below is not None:
        steps = [model.Threshold(value=None, color="red"), model.Threshold(value=red_below, color="green")]
    return (stat.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
            .targets([target(expr, legend)])
            .thresholds(dashboard.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps))
            .color_mode(common.BigValueColorMode.VALUE).graph_mode(common.BigValueGraphMode.AREA)
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"])))


def board(uid: str, title: str, description: str,
          with_variables: list[dashboard.DatasourceVariable | dashboard.QueryVariable]) -> dashboard.Dashboard:
    """A kvpilot dashboard's frame: what every board shares, with its variables (`variables()`)
    in order."""
    d = (dashboard.Dashboard(title).uid(uid).description(description).tags(["kvpilot"])
         .time("now-1h", "now").refresh("30s").timezone("browser").editable()
         .tooltip(model.DashboardCursorSync.CROSSHAIR))
    for v in with_variables:
        d = d.with_variable(v)
    return d
