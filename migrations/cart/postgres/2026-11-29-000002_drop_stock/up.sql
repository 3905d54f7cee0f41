-- Cart orders what is listed; stock is checked where it is reserved (catalog).
ALTER TABLE cart_products DROP COLUMN available;
