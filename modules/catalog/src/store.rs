//! Catalog tables and queries. Functions take a connection so the caller owns
//! the transaction (and the outbox rows written with it).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use kernel::AnyConnection;

use crate::schema::products;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = products)]
pub struct ProductRow {
    pub id: String,
    pub sku: String,
    pub seller_id: String,
    pub name: String,
    pub description: Option<String>,
    pub price_minor: i64,
    pub currency: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub listed: bool,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// Columns a details/price update may change.
#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = products)]
pub struct ProductChanges {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub price_minor: Option<i64>,
    pub currency: Option<String>,
    pub updated_at: Option<NaiveDateTime>,
}

pub fn insert(conn: &mut AnyConnection, row: &ProductRow) -> QueryResult<()> {
    diesel::insert_into(products::table)
        .values(row)
        .execute(conn)?;
    Ok(())
}

pub fn find(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<ProductRow>> {
    products::table
        .find(id)
        .select(ProductRow::as_select())
        .first(conn)
        .optional()
}

/// Reads a product for change, holding its row lock until the transaction ends
/// (an update that changes nothing takes the lock on both backends).
pub fn lock(conn: &mut AnyConnection, id: &str) -> QueryResult<Option<ProductRow>> {
    let touched = diesel::update(products::table.find(id))
        .set(products::id.eq(products::id))
        .execute(conn)?;
    if touched == 0 {
        return Ok(None);
    }
    find(conn, id)
}

/// Listed products after `after` (by id, which is time-ordered), at most `limit`.
pub fn page(
    conn: &mut AnyConnection,
    after: Option<&str>,
    limit: i64,
) -> QueryResult<Vec<ProductRow>> {
    let mut query = products::table
        .filter(products::listed.eq(true))
        .order(products::id.asc())
        .limit(limit)
        .select(ProductRow::as_select())
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(products::id.gt(after.to_string()));
    }
    query.load(conn)
}

pub fn update(conn: &mut AnyConnection, id: &str, changes: &ProductChanges) -> QueryResult<()> {
    diesel::update(products::table.find(id))
        .set(changes)
        .execute(conn)?;
    Ok(())
}

pub fn set_on_hand(
    conn: &mut AnyConnection,
    id: &str,
    on_hand: i64,
    now: NaiveDateTime,
) -> QueryResult<()> {
    diesel::update(products::table.find(id))
        .set((products::on_hand.eq(on_hand), products::updated_at.eq(now)))
        .execute(conn)?;
    Ok(())
}

pub fn delist(conn: &mut AnyConnection, id: &str, now: NaiveDateTime) -> QueryResult<()> {
    diesel::update(products::table.find(id))
        .set((products::listed.eq(false), products::updated_at.eq(now)))
        .execute(conn)?;
    Ok(())
}

/// Whether `e` is a unique-constraint violation (on either backend).
pub fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

impl ProductRow {
    pub fn stock(&self) -> crate::domain::Stock {
        crate::domain::Stock {
            on_hand: self.on_hand,
            reserved: self.reserved,
        }
    }
}
