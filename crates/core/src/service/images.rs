//! Images and tags: visibility across namespaces, tag resolution and changes, lineage.

use boxwood_store::{ImageFilter, ImageRecord};
use uuid::Uuid;

use super::{ImageQuery, Page, Service};
use crate::auth::{Caller, Permission};
use crate::clock::{format_ts, now_us};
use crate::error::{CoreError, CoreResult};
use crate::model::{ImageView, LineageView, RemovedImageView};
use crate::spec::is_valid_tag;

impl Service {
    /// An image the caller can see (its own namespace or the public one).
    pub(super) async fn visible_image(&self, caller: &Caller, uuid: Uuid) -> CoreResult<ImageRecord> {
        let visible = caller.visible_namespaces();
        match self.inner.store.get_image(uuid).await? {
            Some(img) if visible.contains(&img.namespace) => Ok(img),
            Some(_) => Err(CoreError::NotFound(format!("image {uuid}"))),
            None => match self.inner.store.removed_image(uuid).await? {
                Some(r) if visible.contains(&r.namespace) => Err(CoreError::NotFound(format!(
                    "image {uuid} (removed by the retention policy at {})",
                    format_ts(r.removed_at_us)
                ))),
                _ => Err(CoreError::NotFound(format!("image {uuid}"))),
            },
        }
    }

    /// Resolves a tag without a permission check: the caller's namespace first, then public.
    pub(super) async fn lookup_tag(&self, caller: &Caller, tag: &str) -> CoreResult<Uuid> {
        for ns in caller.visible_namespaces() {
            if let Some(uuid) = self.inner.store.resolve_tag(&ns, tag).await? {
                return Ok(uuid);
            }
        }
        Err(CoreError::NotFound(format!("image with tag {tag:?}")))
    }

    /// `GET /inspect/?tag=`.
    pub async fn resolve_tag(&self, caller: &Caller, tag: &str) -> CoreResult<Uuid> {
        caller.require(Permission::List)?;
        if !is_valid_tag(tag) {
            return Err(CoreError::bad(format!("invalid tag {tag:?}")));
        }
        self.lookup_tag(caller, tag).await
    }

    /// The tag an image shows to this caller: its own namespace's first, else a public one.
    async fn visible_tag(&self, caller: &Caller, uuid: Uuid) -> CoreResult<Option<String>> {
        let tags = self.inner.store.tags_of(uuid, &caller.visible_namespaces()).await?;
        let own = tags.iter().find(|t| t.namespace == caller.namespace);
        let shown = match own {
            Some(t) => Some(t),
            // A public tag the caller's namespace shadows with its own image is not this one's.
            None => {
                let mut shown = None;
                for t in &tags {
                    if self.inner.store.resolve_tag(&caller.namespace, &t.tag).await?.is_none() {
                        shown = Some(t);
                        break;
                    }
                }
                shown
            }
        };
        Ok(shown.map(|t| t.tag.clone()))
    }

    fn image_view(caller: &Caller, img: &ImageRecord, tag: Option<String>) -> ImageView {
        ImageView {
            uuid: img.uuid.to_string(),
            tag,
            created_at: format_ts(img.created_at_us),
            // Null for images of another namespace, as the contract says.
            operation_uuid: img.operation_uuid.filter(|_| img.namespace == caller.namespace).map(|u| u.to_string()),
        }
    }

    async fn view_of(&self, caller: &Caller, img: &ImageRecord) -> CoreResult<ImageView> {
        let tag = self.visible_tag(caller, img.uuid).await?;
        Ok(Self::image_view(caller, img, tag))
    }

    pub async fn get_image(&self, caller: &Caller, uuid: Uuid) -> CoreResult<ImageView> {
        caller.require(Permission::List)?;
        let img = self.visible_image(caller, uuid).await?;
        self.view_of(caller, &img).await
    }

    pub async fn list_images(&self, caller: &Caller, q: ImageQuery, page: Page) -> CoreResult<Vec<ImageView>> {
        caller.require(Permission::List)?;
        if let Some(prefix) = &q.tag_prefix
            && !is_valid_tag(prefix)
        {
            return Err(CoreError::bad(format!("invalid tag prefix {prefix:?}")));
        }
        let filter = ImageFilter {
            namespaces: caller.visible_namespaces(),
            // Asking for a tag prefix only makes sense among tagged images.
            tagged: q.tagged || q.tag_prefix.is_some(),
            tag_prefix: q.tag_prefix,
            uuid: q.uuid,
            since_us: q.since_us,
            until_us: q.until_us,
            limit: page.limit,
            offset: page.offset,
        };
        let rows = self.inner.store.list_images(&filter).await?;
        Ok(rows.iter().map(|r| Self::image_view(caller, &r.image, r.tag.clone())).collect())
    }

    /// `PATCH /images/{uuid}/tag`: points `tag` in the caller's namespace at the image,
    /// taking it from any other holder there (a tag on a public image "freezes" it).
    pub async fn set_image_tag(&self, caller: &Caller, uuid: Uuid, tag: &str) -> CoreResult<ImageView> {
        caller.require(Permission::SetImageTag)?;
        if !is_valid_tag(tag) {
            return Err(CoreError::bad(format!("invalid tag {tag:?}")));
        }
        let img = self.visible_image(caller, uuid).await?;
        self.inner.store.set_tag(&caller.namespace, tag, uuid, now_us()).await?;
        Ok(Self::image_view(caller, &img, Some(tag.to_owned())))
    }

    /// `DELETE /images/{uuid}/tag[?tag=]`: removes one or all of the caller's tags on it.
    pub async fn delete_image_tag(&self, caller: &Caller, uuid: Uuid, tag: Option<&str>) -> CoreResult<()> {
        caller.require(Permission::SetImageTag)?;
        self.visible_image(caller, uuid).await?;
        match tag {
            Some(t) => {
                if !is_valid_tag(t) {
                    return Err(CoreError::bad(format!("invalid tag {t:?}")));
                }
                if !self.inner.store.delete_tag(&caller.namespace, t, uuid).await? {
                    return Err(CoreError::NotFound(format!("tag {t:?} on image {uuid}")));
                }
            }
            None => {
                self.inner.store.delete_tags_of(&caller.namespace, uuid).await?;
            }
        }
        Ok(())
    }

    /// Ancestors (parent first, up to the root) and direct children of an image, as far as
    /// the caller can see them.
    pub async fn image_lineage(&self, caller: &Caller, uuid: Uuid) -> CoreResult<LineageView> {
        caller.require(Permission::List)?;
        let img = self.visible_image(caller, uuid).await?;
        let visible = caller.visible_namespaces();
        let mut ancestors = Vec::new();
        let mut next = img.parent_uuid;
        while let Some(parent) = next {
            match self.inner.store.get_image(parent).await? {
                Some(p) if visible.contains(&p.namespace) => {
                    next = p.parent_uuid;
                    ancestors.push(self.view_of(caller, &p).await?);
                }
                _ => break,
            }
        }
        let mut children = Vec::new();
        for c in self.inner.store.children_of(uuid).await? {
            if visible.contains(&c.namespace) {
                children.push(self.view_of(caller, &c).await?);
            }
        }
        let removed_children = self
            .inner
            .store
            .removed_children(uuid)
            .await?
            .into_iter()
            .filter(|r| visible.contains(&r.namespace))
            .map(|r| RemovedImageView {
                uuid: r.uuid.to_string(),
                created_at: format_ts(r.created_at_us),
                removed_at: format_ts(r.removed_at_us),
                reason: r.reason,
            })
            .collect();
        Ok(LineageView {
            image: self.view_of(caller, &img).await?,
            parent: img.parent_uuid.map(|u| u.to_string()),
            ancestors,
            children,
            removed_children,
        })
    }

    /// Registers an image built by the server itself (the seeded base image) in `namespace`
    /// under `tag`, unless the tag already names an image.
    pub async fn ensure_tagged_image(&self, namespace: &str, tag: &str, image: ImageRecord) -> CoreResult<Uuid> {
        if let Some(existing) = self.inner.store.resolve_tag(namespace, tag).await? {
            return Ok(existing);
        }
        self.inner.store.insert_image(&image).await?;
        self.inner.store.set_tag(namespace, tag, image.uuid, now_us()).await?;
        Ok(image.uuid)
    }

    /// Whether `tag` already names an image in `namespace`.
    pub async fn has_tag(&self, namespace: &str, tag: &str) -> CoreResult<bool> {
        Ok(self.inner.store.resolve_tag(namespace, tag).await?.is_some())
    }
}
