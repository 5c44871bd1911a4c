//! Start-up and shutdown: builds the state, loads the embedding model, composes the app
//! (middlewares, extractor error handlers, routes), binds, loads the chat model in the
//! background, and drains on SIGTERM.

use std::sync::Arc;

use actix_web::{web, App, HttpServer};

use crate::config::{EngineKind, Settings};
use crate::engine::candle::{CandleEngine, CandleOptions};
use crate::engine::mistral::{MistralEngine, ModelSource};
use crate::engine::Engine;
use crate::routes::{metrics, not_found, routes};
use crate::state::AppState;

/// Loads the embedding model (if any), binds, prints the address, loads the chat model, prints
/// `ready`, and serves until stopped.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Check the model path before binding, so a typo fails fast with the path in the message.
    if settings.engine != EngineKind::Echo {
        ModelSource::detect(&settings.model_path).map_err(anyhow::Error::msg)?;
    }
    let state = web::Data::new(AppState::new(&settings).map_err(|e| {
        anyhow::anyhow!(
            "the feedback store under {} cannot be opened: {e}",
            settings.data_dir.join(protocol::names::FEEDBACK_DIR).display()
        )
    })?);
    if let Some(dir) = &settings.embed_model {
        let embeddings = crate::embeddings::Embeddings::start(dir, &state.metrics)
            .map_err(|e| anyhow::anyhow!("setting embed_model (SWITCHYARD_EMBED_MODEL) {}: {e}", dir.display()))?;
        tracing::info!(model = %embeddings.id, dimension = embeddings.limits().dimension, "embedding model loaded");
        let dimension = embeddings.limits().dimension;
        let _ = state.embeddings.set(embeddings);
        state.clone().into_inner().open_applications(dimension, settings.redis.clone())?;
    }
    let app_state = state.clone();
    let metrics_here = settings.metrics_listen.is_none();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            // Authentication runs inside the request metrics, so refusals are counted too.
            .wrap(actix_web::middleware::from_fn(crate::middleware::authenticate))
            .wrap(actix_web::middleware::from_fn(crate::middleware::observe))
            .configure(crate::error::extractor_configs)
            .configure(|cfg| routes(cfg, metrics_here))
            .configure(crate::admin::routes)
            .configure(crate::console::routes)
            .configure(crate::labelling::routes)
            .configure(crate::releases::routes)
            .configure(crate::shadow::routes)
            .configure(crate::feedback_api::routes)
            .configure(crate::finetune_api::routes)
            .configure(crate::tasks::routes)
            .default_service(web::to(not_found))
    })
    .workers(settings.http_workers)
    .shutdown_timeout(settings.shutdown_timeout)
    // Signals are ours: `/ready` must turn false the moment draining starts.
    .disable_signals()
    .bind((settings.host.as_str(), settings.port))
    .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", settings.host, settings.port))?;
    for addr in server.addrs() {
        println!("switchyard listening on http://{addr}");
    }
    let metrics_server = match &settings.metrics_listen {
        Some(addr) => {
            let metrics_state = state.clone();
            let server = HttpServer::new(move || {
                App::new().app_data(metrics_state.clone()).route("/metrics", web::get().to(metrics))
            })
            .workers(1)
            .disable_signals()
            .bind(addr.as_str())
            .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr} (SWITCHYARD_METRICS_LISTEN): {e}"))?;
            for addr in server.addrs() {
                println!("switchyard metrics on http://{addr}/metrics");
            }
            Some(server.run())
        }
        None => None,
    };
    let server = server.run();
    let handle = server.handle();
    // The metrics listener runs beside the API server and stops when it stops.
    let metrics_handle = metrics_server.map(|m| {
        let h = m.handle();
        tokio::spawn(m);
        h
    });
    state.limiter.connect();
    if let Some(client) = settings.redis.clone() {
        let shared = crate::feedback_stream::SharedFeedback::start(client, state.feedback.dir(), state.metrics.clone());
        let _ = state.feedback.shared.set(shared);
    }
    let drain_state = state.clone();
    let drain_handle = handle.clone();
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        drain_state.start_draining();
        tracing::info!("stop signal: draining in-flight requests, then exiting");
        drain_handle.stop(true).await;
    });

    let loader_state = state.clone();
    tokio::spawn(async move {
        let loaded: anyhow::Result<Arc<dyn Engine>> = match settings.engine {
            EngineKind::Candle => {
                let (path, id) = (settings.model_path.clone(), settings.model_id.clone());
                let options = CandleOptions {
                    context_cap: settings.context_len,
                    threads: settings.threads,
                    prefix_cache_bytes: settings.prefix_cache_bytes,
                    activations: settings.activations,
                };
                let metrics = loader_state.metrics.engine.clone();
                tokio::task::spawn_blocking(move || CandleEngine::load(&path, id, options, metrics))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r)
                    .map(|e| Arc::new(e) as Arc<dyn Engine>)
            }
            EngineKind::Echo => {
                Ok(Arc::new(crate::engine::echo::EchoEngine::new(settings.model_id.clone(), settings.context_len))
                    as Arc<dyn Engine>)
            }
            EngineKind::Mistralrs => MistralEngine::load(
                &settings.model_path,
                settings.model_id.clone(),
                settings.max_concurrent,
                settings.context_len,
            )
            .await
            .map(|e| Arc::new(e) as Arc<dyn Engine>),
        };
        match loaded {
            Ok(engine) => {
                tracing::info!(model = %settings.model_id, context = engine.info().context_len, "model loaded");
                if let Err(e) = loader_state.set_engine(engine) {
                    eprintln!("error: the adapter registry cannot be opened: {e}");
                    handle.stop(false).await;
                    std::process::exit(1);
                }
                if let Some(registry) = loader_state.registry() {
                    crate::replicas::watch(registry);
                    crate::releases::spawn_controller(loader_state.clone().into_inner(), settings.release_tick);
                }
                if let Some(client) = settings.redis.clone() {
                    loader_state.clone().into_inner().share_registry(client);
                }
                println!("switchyard ready");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "model failed to load; stopping");
                eprintln!("error: {e:#}");
                handle.stop(false).await;
                std::process::exit(1);
            }
        }
    });
    server.await?;
    if let Some(h) = metrics_handle {
        h.stop(true).await;
    }
    Ok(())
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
