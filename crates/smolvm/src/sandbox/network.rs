//! `smolvm network`: a sandbox's policy, changed while it runs.

use super::{lifecycle::LifecycleError, Smolvm, Status};
use crate::net::{self, NetworkPolicy};

impl Smolvm {
    /// Replaces a sandbox's network policy. A running sandbox applies it to every new
    /// connection at once (no restart); a stopped one at its next start.
    pub fn set_network(&self, name: &str, policy: &NetworkPolicy) -> Result<(), LifecycleError> {
        policy.validate().map_err(|source| LifecycleError::Policy { name: name.into(), source })?;
        let _lock = self.lock(name)?;
        let row = self.row(name)?;
        self.db().set_policy(name, policy)?;
        if Self::status_of(&row) != Status::Running {
            return Ok(());
        }
        let dir = self.dir(name);
        let apply = || -> Result<(), net::NetError> {
            let mut cfg = net::read_config(&dir)?;
            cfg.policy = policy.clone();
            net::write_config(&dir, &cfg)?;
            net::control(&dir, &net::ControlRequest::Reload { policy: policy.clone() }).map(|_| ())
        };
        apply().map_err(|source| LifecycleError::PolicyNotApplied { name: name.into(), source })
    }
}
