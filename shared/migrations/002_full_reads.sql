-- When each flow entity was last read in full (change detection with a periodic full read).
ALTER TABLE cursors ADD COLUMN last_full_at timestamptz;
