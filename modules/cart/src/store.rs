//! Cart tables and queries; functions take a connection so the caller owns the
//! transaction.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use kernel::AnyConnection;

use crate::schema::{cart_items, cart_products};

/// Cart's copy of a catalog product.
#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = cart_products)]
pub struct ProductRow {
    pub product_id: String,
    pub name: String,
    pub price_minor: i64,
    pub currency: String,
    pub listed: bool,
    pub updated_at: NaiveDateTime,
}

/// Changes to a known product, from one catalog event.
#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = cart_products)]
pub struct ProductChanges {
    pub name: Option<String>,
    pub price_minor: Option<i64>,
    pub currency: Option<String>,
    pub listed: Option<bool>,
    pub updated_at: Option<NaiveDateTime>,
}

pub fn upsert_product(conn: &mut AnyConnection, row: &ProductRow) -> QueryResult<()> {
    let updated = diesel::update(cart_products::table.find(&row.product_id))
        .set(row)
        .execute(conn)?;
    if updated == 0 {
        diesel::insert_into(cart_products::table)
            .values(row)
            .execute(conn)?;
    }
    Ok(())
}

/// Applies `changes` to a known product; `false` when cart never heard of it.
pub fn change_product(
    conn: &mut AnyConnection,
    product_id: &str,
    changes: &ProductChanges,
) -> QueryResult<bool> {
    let updated = diesel::update(cart_products::table.find(product_id))
        .set(changes)
        .execute(conn)?;
    Ok(updated > 0)
}

pub fn find_product(conn: &mut AnyConnection, product_id: &str) -> QueryResult<Option<ProductRow>> {
    cart_products::table
        .find(product_id)
        .select(ProductRow::as_select())
        .get_result(conn)
        .optional()
}

/// A customer's lines with the products they refer to, oldest line first.
pub fn lines(conn: &mut AnyConnection, customer_id: &str) -> QueryResult<Vec<(i64, ProductRow)>> {
    cart_items::table
        .inner_join(cart_products::table)
        .filter(cart_items::customer_id.eq(customer_id))
        .order((cart_items::added_at.asc(), cart_items::product_id.asc()))
        .select((cart_items::quantity, ProductRow::as_select()))
        .load(conn)
}

/// Sets the quantity of a line, adding it if new.
pub fn set_quantity(
    conn: &mut AnyConnection,
    customer_id: &str,
    product_id: &str,
    quantity: i64,
    now: NaiveDateTime,
) -> QueryResult<()> {
    let updated = diesel::update(cart_items::table.find((customer_id, product_id)))
        .set((
            cart_items::quantity.eq(quantity),
            cart_items::updated_at.eq(now),
        ))
        .execute(conn)?;
    if updated == 0 {
        diesel::insert_into(cart_items::table)
            .values((
                cart_items::customer_id.eq(customer_id),
                cart_items::product_id.eq(product_id),
                cart_items::quantity.eq(quantity),
                cart_items::added_at.eq(now),
                cart_items::updated_at.eq(now),
            ))
            .execute(conn)?;
    }
    Ok(())
}

pub fn remove_line(
    conn: &mut AnyConnection,
    customer_id: &str,
    product_id: &str,
) -> QueryResult<()> {
    diesel::delete(cart_items::table.find((customer_id, product_id))).execute(conn)?;
    Ok(())
}
