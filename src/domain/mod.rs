//! The exchange's pure core: leads, money, auctions, marketplace rules. No I/O, no async, no
//! clock reads: time comes in as Unix milliseconds.

pub mod auction;
pub mod breaker;
pub mod campaign;
pub mod caps;
pub mod filters;
pub mod lead;
pub mod money;
pub mod schedule;

pub use auction::{AuctionRules, Bid, DropReason, PostQueue, Ranking, rank};
pub use lead::{FieldErrors, FieldMap, Lead};
pub use money::Price;
