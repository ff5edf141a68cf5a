//! stream-relay: a streaming relay for LLM and TTS APIs on Pingora.
//!
//! The request's path through the modules: `headgate` reads the head, the hooks of
//! `proxy` (a folder of rooms, one per stage) call `policy`, `route`, `auth`, `gate` and
//! `limits` to admit it, `upstream` for the peer, `tap` to measure the answer, `answer`
//! and `error` for every answer the relay writes itself, and `recorder` at the end (row,
//! access line, metrics). `server` wires it all from `config`.

pub mod admin;
pub mod answer;
pub mod auth;
pub mod breaker;
pub mod budget;
pub mod cache;
pub mod config;
pub mod conncap;
pub mod cost;
pub mod error;
pub mod fdlimit;
pub mod gate;
pub mod headgate;
pub mod health;
pub mod limits;
pub mod logsink;
pub mod metrics;
pub mod mock;
pub mod policy;
pub mod provider;
pub mod proxy;
pub mod record;
pub mod recorder;
pub mod reload;
pub mod request_id;
pub mod request_info;
pub mod route;
pub mod rows;
pub mod secret;
pub mod server;
pub mod sse;
pub mod stall;
pub mod tap;
pub mod telemetry;
pub mod upstream;
pub mod websocket;
