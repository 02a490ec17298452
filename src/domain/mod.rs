//! The exchange's pure core: leads, money, auctions. No I/O, no async, no clock reads.

pub mod auction;
pub mod lead;
pub mod money;

pub use auction::{AuctionRules, Bid, DropReason, PostQueue, Ranking, rank};
pub use lead::{FieldErrors, FieldMap, Lead};
pub use money::Price;
