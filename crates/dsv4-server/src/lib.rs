//! dsv4-server: an OpenAI-compatible HTTP server for dsv4 — `/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`, `/health`, `/metrics` — with streaming, continuous batching
//! of concurrent requests and a prefix cache.
//!
//! Layout: [`routes`] (axum handlers, SSE) → [`engine`] (the scheduler thread) → [`backend`]
//! (the model behind a small trait); [`prefix_cache`] holds state snapshots; [`chat_stream`]
//! splits streamed chat text into reasoning, answer and tool calls; [`api`] and [`error`] are the
//! OpenAI request and error shapes.

pub mod api;
pub mod backend;
pub mod chat_stream;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod prefix_cache;
pub mod routes;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub use backend::{Backend, BatchItem, CpuBackend};
pub use engine::{EngineConfig, EngineHandle};
pub use routes::AppState;

use dsv4_core::tokenizer::Tokenizer;

/// What the server is started with.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub model_name: String,
    pub api_key: Option<String>,
    pub engine: EngineConfig,
}

/// Starts the engine thread for `backend` and returns the router serving it.
pub fn app<B: Backend>(
    backend: B,
    tokenizer: Tokenizer,
    config: ServerConfig,
) -> std::io::Result<axum::Router> {
    let (max_context, vocab_size) = (backend.max_context(), backend.vocab_size());
    let tokenizer = Arc::new(tokenizer);
    let engine = engine::start(backend, Arc::clone(&tokenizer), config.engine)?;
    let state = Arc::new(AppState {
        engine,
        tokenizer,
        model_name: config.model_name,
        max_context,
        vocab_size,
        api_key: config.api_key,
        next_id: AtomicU64::new(0),
    });
    Ok(routes::router(state))
}

/// Serves `app` on `listener` until ctrl-c.
pub async fn serve(listener: tokio::net::TcpListener, app: axum::Router) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
