-- What a sandbox's timeout does ('kill', or 'pause': the control plane pauses it, and the agent
-- is given no timeout), and whether traffic to a paused sandbox resumes it (0 or 1).
ALTER TABLE sandboxes ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'kill';
ALTER TABLE sandboxes ADD COLUMN auto_resume BIGINT NOT NULL DEFAULT 0;
CREATE INDEX sandboxes_expiry ON sandboxes (state, expires_at);
