DROP TABLE reservation_refusals;
DROP TABLE reservations;
