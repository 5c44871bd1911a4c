//! The `switchyard` binary: parses the command line and runs the chosen subcommand.

use clap::Parser;
use gateway::auth::{mint_hs256, Claims, Role};
use gateway::config::{Cli, Command, RoleArg};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::MintToken(m) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let claims = Claims {
                sub: m.sub,
                tenant: m.tenant,
                role: match m.role {
                    RoleArg::User => Role::User,
                    RoleArg::Labeller => Role::Labeller,
                    RoleArg::Admin => Role::Admin,
                },
                models: m.models,
                rpm: m.rpm,
                tpm: m.tpm,
                max_streams: m.max_streams,
                exp: Some(now + m.ttl_seconds),
                nbf: Some(now),
                iss: m.issuer,
                aud: m.audience,
            };
            match mint_hs256(&m.secret, &claims) {
                Ok(token) => {
                    println!("{token}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Openapi => {
            print!("{}", gateway::openapi_doc::spec_json());
            std::process::ExitCode::SUCCESS
        }
        Command::HashApiKey { key } => {
            use sha2::Digest;
            println!("{}", hex::encode(sha2::Sha256::digest(key.as_bytes())));
            std::process::ExitCode::SUCCESS
        }
        Command::Serve(args) => {
            let settings = match args.into_settings() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            gateway::init_logging(settings.log_format);
            if settings.auth.is_none() {
                tracing::warn!(
                    "AUTHENTICATION IS OFF (SWITCHYARD_AUTH=off): anyone who can reach this port can use every model"
                );
            }
            // mistralrs blocks in place on its engine thread, which needs a multi-threaded
            // tokio runtime; actix runs its workers on their own threads inside it.
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(gateway::server::run(settings));
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
