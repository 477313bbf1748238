//! Health checks: the config-file side. The checks themselves live in `balancer-health`.

pub use balancer_health::{HealthSpec, Monitor};

/// Parses and validates a service's `health = { … }` table.
pub fn spec_from_table(t: &toml::Table) -> Result<HealthSpec, String> {
    let spec: HealthSpec = toml::Value::Table(t.clone())
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    spec.validate().map_err(|e| e.to_string())?;
    Ok(spec)
}
