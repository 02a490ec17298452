//! The actors: one per campaign (runs auctions), one per buyer (talks HTTP to the buyer).

pub mod buyer;
pub mod campaign;
pub mod messages;

pub use buyer::{BuyerActor, BuyerHealth, BuyerSettings};
pub use campaign::{CampaignActor, CampaignBuyer, CampaignServices, CampaignSettings};
pub use messages::{AuctionError, RunAuction};
