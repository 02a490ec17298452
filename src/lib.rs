//! leadex: a real-time ping-post lead exchange.

pub mod actors;
pub mod buyers;
pub mod clock;
pub mod config;
pub mod coord;
pub mod demo;
pub mod domain;
pub mod drain;
pub mod http;
pub mod loadgen;
pub mod ratelimit;
pub mod sim;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod webhooks;
