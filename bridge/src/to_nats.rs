//! Covet -> NATS routes (not built yet: the lead's skeleton).

use crate::config::{Route, ToNats};
use crate::RouteContext;

/// Runs one Covet -> NATS route until `ctx.stop`.
pub async fn run(route: &Route, spec: &ToNats, ctx: RouteContext) -> anyhow::Result<()> {
    let _ = (route, spec, ctx);
    anyhow::bail!("Covet -> NATS routes are not built yet")
}
