//! stream-relay: a streaming relay for LLM and TTS APIs on Pingora.
//!
//! The request's path through the modules: `route` and `auth` decide in
//! `request_filter`, `upstream` gives the peer, `proxy` holds the thin `ProxyHttp` hooks,
//! `error` shapes every answer the relay writes itself, `metrics` observes the end.

pub mod admin;
pub mod answer;
pub mod auth;
pub mod breaker;
pub mod config;
pub mod conncap;
pub mod cost;
pub mod error;
pub mod fdlimit;
pub mod gate;
pub mod headgate;
pub mod health;
pub mod limits;
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
pub mod upstream;
