-- The checkout module's own schema starts here; its tables arrive with its features.
SELECT 1;
