//! Helpers for tests that need a real backend (feature `testing`).

pub mod fake_llm;
mod proxy;

pub use proxy::Proxy;

use sea_orm::ConnectionTrait;

/// A fresh PostgreSQL database for one test, on the server `TEST_DATABASE_URL` names; dropped
/// by [`TempDatabase::drop`].
pub struct TempDatabase {
    admin: String,
    pub name: String,
    pub url: String,
}

impl TempDatabase {
    pub async fn create(admin_url: &str) -> Self {
        let name = confab_core::testing::unique("confab_test_").to_lowercase();
        let admin = sea_orm::Database::connect(admin_url)
            .await
            .expect("the test database server answers");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("a test database can be created");
        let mut url = url::Url::parse(admin_url).expect("TEST_DATABASE_URL is a URL");
        url.set_path(&name);
        Self {
            admin: admin_url.to_owned(),
            name,
            url: url.to_string(),
        }
    }

    pub async fn drop(self) {
        if let Ok(admin) = sea_orm::Database::connect(&self.admin).await {
            let _ = admin
                .execute_unprepared(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}
