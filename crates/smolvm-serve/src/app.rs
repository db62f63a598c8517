//! The server's shared state: how to open the library, the API key, the per-sandbox records,
//! and one long-lived agent connection per sandbox with the processes started through it.
//!
//! The library is blocking, the HTTP side async: every library call runs on tokio's blocking
//! pool through [`App::blocking`], on the one [`Smolvm`] handle of the server (it is `Sync`;
//! opened on first use, since opening reconciles the home and may fail).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use smolvm::agent::AgentClient;
use smolvm::sandbox::Smolvm;

use crate::key::ApiKey;
use crate::meta::MetaStore;
use crate::process::Proc;

/// How the server is set up (the CLI builds it; the library reads no environment).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub smolvm: smolvm::config::Config,
    pub key: ApiKey,
    /// A sandbox created without a timeout lives this long (E2B's default: 300 s).
    pub default_timeout_secs: u64,
    /// How often expired sandboxes are looked for.
    pub reap_interval: std::time::Duration,
    /// Host names (besides loopback's) that `/mcp` answers to: its guard against DNS
    /// rebinding refuses others.
    pub public_hosts: Vec<String>,
    /// Whether API callers may open the host to a sandbox (`allow_host_ports`) or private
    /// ranges (`allow_private`): off unless the server was started with the flag that allows
    /// it. Any API caller holds the key; the host's services are not theirs to hand out.
    pub allow_host_access: bool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failure of the library or its thread pool, before any API shape is given to it.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("open smolvm's state: {0}")]
    Open(#[from] smolvm::state::StateError),
    #[error("a worker thread failed: {0}")]
    Join(String),
}

/// One agent connection of a running sandbox, and the processes started through it.
#[derive(Debug)]
pub struct Conn {
    pub name: String,
    pub client: AgentClient,
    pub procs: Mutex<HashMap<u32, Arc<Proc>>>,
    /// What the sandbox's callers hold on the server (processes, watches), bounded.
    pub limits: crate::limits::Limits,
    next_pid: AtomicU32,
}

impl Conn {
    /// A process handle number: E2B's "pid". The guest's own pids are not reported by the
    /// agent; these are unique per connection and never reused.
    pub fn next_pid(&self) -> u32 {
        self.next_pid.fetch_add(1, Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct App {
    pub config: ServeConfig,
    pub meta: MetaStore,
    smolvm: Mutex<Option<Arc<Smolvm>>>,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    /// The polled file system watchers (`CreateWatcher`), by id.
    pub watchers: crate::envd::filesystem::Watchers,
}

impl App {
    pub fn new(config: ServeConfig) -> Arc<App> {
        let meta = MetaStore::new(config.smolvm.home.data.join("serve").join("sandboxes"));
        Arc::new(App { config, meta, smolvm: Mutex::default(), conns: Mutex::default(), watchers: Mutex::default() })
    }

    /// Sandbox `id`'s access token (bound to its creation: `Meta::generation`).
    pub fn sandbox_token(&self, id: &str) -> String {
        self.key().sandbox_token(id, &self.generation(id))
    }

    /// Whether `token` is sandbox `id`'s.
    pub fn token_matches(&self, id: &str, token: &str) -> bool {
        self.key().token_matches(id, &self.generation(id), token)
    }

    /// Whether `token` was the token of the sandbox of this name that was removed last.
    pub fn token_was_valid(&self, id: &str, token: &str) -> bool {
        self.meta.gone_generation(id).is_some_and(|g| self.key().token_matches(id, &g, token))
    }

    fn generation(&self, id: &str) -> String {
        self.meta.get(id).map(|m| m.generation).unwrap_or_default()
    }

    pub fn key(&self) -> &ApiKey {
        &self.config.key
    }

    fn smolvm(&self) -> Result<Arc<Smolvm>, AppError> {
        let mut s = lock(&self.smolvm);
        if let Some(s) = s.as_ref() {
            return Ok(s.clone());
        }
        let opened = Arc::new(Smolvm::open(self.config.smolvm.clone())?);
        *s = Some(opened.clone());
        Ok(opened)
    }

    /// Runs `f` with a library handle on the blocking pool.
    pub async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Smolvm) -> T + Send + 'static,
    ) -> Result<T, AppError> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            let s = app.smolvm()?;
            Ok(f(&s))
        })
        .await
        .map_err(|e| AppError::Join(e.to_string()))?
    }

    /// The agent connection of running sandbox `name` (made on first use, made anew when the
    /// old one ended).
    pub async fn conn(self: &Arc<Self>, name: &str) -> Result<Arc<Conn>, smolvm::agent::AgentError> {
        if let Some(c) = lock(&self.conns).get(name).filter(|c| !c.client.is_closed()) {
            return Ok(c.clone());
        }
        let n = name.to_string();
        let client = self
            .blocking(move |s| s.agent(&n))
            .await
            .map_err(|e| smolvm::agent::AgentError::Lost { sandbox: name.into(), reason: e.to_string() })??;
        let conn = Arc::new(Conn {
            name: name.to_string(),
            client,
            procs: Mutex::default(),
            limits: Default::default(),
            next_pid: AtomicU32::new(1000),
        });
        let mut conns = lock(&self.conns);
        // Two requests raced to connect: keep the first, so that both see one process table.
        let kept = conns.entry(name.to_string()).or_insert_with(|| conn.clone());
        if kept.client.is_closed() {
            *kept = conn;
        }
        Ok(kept.clone())
    }

    /// Forgets the connection of a sandbox that was deleted, paused or stopped.
    pub fn drop_conn(&self, name: &str) {
        lock(&self.conns).remove(name);
    }
}
