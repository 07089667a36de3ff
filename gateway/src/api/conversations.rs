//! `/conversations*`.

use actix_web::{HttpRequest, HttpResponse, web};
use gochat_proto::logic as pb;

use super::model::{
    Conversation, ConversationBody, ConversationsBody, CreateConversationBody, MarkReadBody,
    Message, MessagesBody, MessagesQuery, PageQuery, UnreadBody,
};
use super::{ApiError, ApiState, TraceId, authenticate, call, logic_request};
use crate::LogicApi;

/// Default and largest page of `GET /conversations`.
const DEFAULT_PAGE_SIZE: i32 = 20;
const MAX_PAGE_SIZE: i32 = 100;
/// Default and largest page of `GET /conversations/:id/messages`.
const DEFAULT_MESSAGES: i32 = 50;
const MAX_MESSAGES: i32 = 100;

/// `GET /conversations?page=1&page_size=20` -> `{conversations, total}`
pub(crate) async fn list<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    query: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let page = query.page.unwrap_or(1);
    let page_size = query.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if page < 1 || page_size < 1 {
        return Err(ApiError::invalid(
            "`page` and `page_size` must be at least 1",
            &trace,
        ));
    }
    let req = pb::GetConversationsRequest {
        user_id: caller.user_id,
        page,
        page_size: page_size.min(MAX_PAGE_SIZE),
    };
    let res = call(
        st.logic.get_conversations(logic_request(req, &trace)),
        &trace,
    )
    .await?;
    Ok(HttpResponse::Ok().json(ConversationsBody {
        conversations: res
            .conversations
            .into_iter()
            .map(Conversation::from)
            .collect(),
        total: res.total,
    }))
}

/// `POST /conversations {target_user_id}` -> 201 `{conversation}`
pub(crate) async fn create<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    body: web::Json<CreateConversationBody>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let req = pb::CreateSingleConversationRequest {
        user_id: caller.user_id,
        target_user_id: body.into_inner().target_user_id,
    };
    let res = call(
        st.logic
            .create_single_conversation(logic_request(req, &trace)),
        &trace,
    )
    .await?;
    let conversation = res.conversation.map(Conversation::from).ok_or_else(|| {
        ApiError::new(
            gochat_infra::ErrorCode::Internal,
            "logic returned no conversation",
            &trace,
        )
    })?;
    Ok(HttpResponse::Created().json(ConversationBody { conversation }))
}

/// `GET /conversations/:id/messages?after_seq=N|before_seq=N&limit=50` -> `{messages, has_more}`
pub(crate) async fn messages<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let q = query.into_inner();
    if q.after_seq.is_some() && q.before_seq.is_some() {
        return Err(ApiError::invalid(
            "give `after_seq` or `before_seq`, not both",
            &trace,
        ));
    }
    if q.after_seq.is_some_and(|s| s < 0) || q.before_seq.is_some_and(|s| s < 0) {
        return Err(ApiError::invalid("seq values must not be negative", &trace));
    }
    let limit = q.limit.unwrap_or(DEFAULT_MESSAGES);
    if limit < 1 {
        return Err(ApiError::invalid("`limit` must be at least 1", &trace));
    }
    let req = pb::GetMessagesRequest {
        user_id: caller.user_id,
        conversation_id: path.into_inner(),
        after_seq: q.after_seq,
        before_seq: q.before_seq,
        limit: limit.min(MAX_MESSAGES),
    };
    let res = call(st.logic.get_messages(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(MessagesBody {
        messages: res.messages.into_iter().map(Message::from).collect(),
        has_more: res.has_more,
    }))
}

/// `POST /conversations/:id/read {seq_id}` -> `{unread_count}`
pub(crate) async fn mark_read<L: LogicApi>(
    st: web::Data<ApiState<L>>,
    trace: TraceId,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<MarkReadBody>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&st.logic, &req, &trace).await?;
    let seq_id = body.into_inner().seq_id;
    if seq_id < 0 {
        return Err(ApiError::invalid("`seq_id` must not be negative", &trace));
    }
    let req = pb::MarkAsReadRequest {
        user_id: caller.user_id,
        conversation_id: path.into_inner(),
        seq_id,
    };
    let res = call(st.logic.mark_as_read(logic_request(req, &trace)), &trace).await?;
    Ok(HttpResponse::Ok().json(UnreadBody {
        unread_count: res.unread_count,
    }))
}
