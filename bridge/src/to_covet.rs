//! NATS -> Covet routes (not built yet: the lead's skeleton).

use crate::config::{Route, ToCovet};
use crate::RouteContext;

/// Runs one NATS -> Covet route until `ctx.stop`.
pub async fn run(route: &Route, spec: &ToCovet, ctx: RouteContext) -> anyhow::Result<()> {
    let _ = (route, spec, ctx);
    anyhow::bail!("NATS -> Covet routes are not built yet")
}
