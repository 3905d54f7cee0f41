DROP INDEX colony_inbox_by_age;
